"""Serving metrics: per-step stats (stats.py), Prometheus collectors and the periodic log line
(loggers.py)."""
