"""The monitor service: Prometheus metrics for the whole pipeline (and, later, recovery)."""
