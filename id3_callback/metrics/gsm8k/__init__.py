"""Local `evaluate` module folder; the metric itself lives in `gsm8k.py` and loads by path."""
