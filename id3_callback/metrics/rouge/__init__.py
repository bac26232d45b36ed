"""Local `evaluate` module folder; the metric itself lives in `rouge.py` and loads by path."""
