"""Local `evaluate` module folder; the metric itself lives in `glue.py` and loads by path."""
