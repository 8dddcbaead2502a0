"""Example trainers shipped with torchrelay."""
