"""The ingest service (see README.md)."""
