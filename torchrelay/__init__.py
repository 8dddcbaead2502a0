"""torchrelay: an event-driven platform from dataset to served PyTorch model.

The importable packages are ``torchrelay.shared`` (the common library) and
``torchrelay.services.<name>`` (one package per service); both map onto the repository's
top-level ``shared/`` and ``services/`` folders.
"""

__version__ = "0.1.0"
