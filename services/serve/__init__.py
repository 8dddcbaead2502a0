"""The serve service (see README.md)."""
