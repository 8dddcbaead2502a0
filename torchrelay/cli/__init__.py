"""The ``torchrelay`` command line: a typer command tree (:mod:`.app`) over modules by what
they act on: the platform here (:mod:`.local`), pipelines, models, run history, and the
platform's contracts and dead letters (:mod:`.admin`)."""

from torchrelay.cli.app import app, main
from torchrelay.cli.local import SERVICES

__all__ = ["SERVICES", "app", "main"]
