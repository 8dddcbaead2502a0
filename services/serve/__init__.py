"""The serve service: model servers and their rollouts (see README.md)."""
