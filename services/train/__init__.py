"""The train service (see README.md)."""
