"""Checkpoints on shared storage: atomic writes, newest valid wins, keep the last K.

A checkpoint is untrusted input (anyone with access to the share can write one): it loads with
``weights_only=True``, and one that is truncated or corrupt is skipped for the one before.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import structlog
import torch

from torchrelay.shared.storage import atomic_write_bytes

log = structlog.get_logger("torchrelay.train.checkpoints")
_NAME = re.compile(r"^step-(\d+)\.pt$")
REQUIRED_KEYS = frozenset({"step", "epoch", "position", "model", "optimizer", "rng"})


def save(folder: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = folder / f"step-{step}.pt"
    atomic_write_bytes(path, buffer.getvalue())
    for old in list_steps(folder)[:-keep]:
        (folder / f"step-{old}.pt").unlink(missing_ok=True)
    return path


def list_steps(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(m[1]) for p in folder.iterdir() if (m := _NAME.match(p.name)))


def load_newest(folder: Path) -> tuple[int, dict[str, Any]] | None:
    """The newest checkpoint that loads and has every part; corrupt ones are skipped."""
    for step in reversed(list_steps(folder)):
        path = folder / f"step-{step}.pt"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is skipped
            log.warning("checkpoint.skipped", path=str(path), error=repr(exc)[:300])
            continue
        if not isinstance(state, dict) or not state.keys() >= REQUIRED_KEYS:
            log.warning("checkpoint.skipped", path=str(path), error="missing parts")
            continue
        return step, state
    return None
