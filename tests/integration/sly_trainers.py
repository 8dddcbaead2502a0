"""Trainers whose source reads as a top-level ``def`` but whose import binds something else:
only the worker's own check, after the import, can see it."""

from __future__ import annotations

import functools
import os

from torchrelay.services.train.worker import TrainingContext


def train(ctx: TrainingContext) -> None:
    raise AssertionError("never called: the name is rebound below")


# A rebinding that reading the source for assignments does not see.
globals()["train"] = os.system


@functools.cache
def cached(ctx: TrainingContext) -> None:
    raise AssertionError("never called: a cache wrapper is not a function")
