"""The training function of bench/recovery.py, and what both of its sides write.

``recovery_trainer:train`` runs under torchrelay (this folder on the path, the module allowed
by ``TORCHRELAY_TRAIN_ENTRYPOINTS``); bench/recovery_plain.py runs the same loop under torchrun.
Each rank of each attempt writes ``attempt-<a>-rank-<r>.json`` before its first step (its pid,
the step it resumed from, a digest of the weights right after the resume) and rank 0 writes
``attempt-<a>-first-step.json`` (wall-clock time) once its first step is done. The bench kills
a rank by that pid and times the kill to the next attempt's first step.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from plain_ddp import DigitsNet
from torch import nn

STEP_PAUSE_S = 0.02
"""Each step also sleeps this long: a step as long as a real one, so a kill lands between
checkpoints and the newest checkpoint at a kill is known."""


def digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors of a state dict, in key order: equal digests, equal weights."""
    hashed = hashlib.sha256()
    for name in sorted(state):
        hashed.update(name.encode())
        hashed.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return hashed.hexdigest()


def write_json(path: Path, value: dict[str, Any]) -> None:
    """Atomically (the bench polls for these files)."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value))
    temporary.replace(path)


def process_started() -> float:
    """When this process started (wall clock; from /proc, so Linux only)."""
    now = time.time()
    up_s = float(Path("/proc/uptime").read_text().split()[0])
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    return now - (up_s - ticks / os.sysconf("SC_CLK_TCK"))


def started(out: Path, attempt: int, rank: int, resumed_from: int | None, weights: str) -> None:
    """Say this rank is ready to step: its pid, when its process started and when it was
    ready (imports, rendezvous, restore and the DDP wrap between the two)."""
    write_json(
        out / f"attempt-{attempt}-rank-{rank}.json",
        {
            "pid": os.getpid(),
            "resumed_from": resumed_from,
            "weights": weights,
            "spawned": process_started(),
            "ready": time.time(),
        },
    )


def first_step(out: Path, attempt: int) -> None:
    write_json(out / f"attempt-{attempt}-first-step.json", {"at": time.time()})


def train(ctx: Any) -> None:
    out = Path(str(ctx.hparams["out"]))
    x, y = ctx.arrays("x", "y")
    x = (x.float() / 16.0).unsqueeze(1)
    y = y.long()
    model = ctx.wrap(DigitsNet())
    optimizer = ctx.attach(torch.optim.Adam(model.parameters(), lr=3e-3))
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    started(out, ctx.spec.attempt, ctx.rank, ctx.resumed_from_step, digest(module.state_dict()))
    loss_fn = nn.CrossEntropyLoss()
    first = True
    for xb, yb in ctx.batches((x, y), batch_size=32, epochs=ctx.integer("epochs", 2)):
        optimizer.zero_grad()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        optimizer.step()
        ctx.step_done(loss=loss.item(), samples=len(xb))
        if first and ctx.rank == 0:
            first_step(out, ctx.spec.attempt)
        first = False
        time.sleep(STEP_PAUSE_S)
    ctx.export(module, example_input=x[:1], metrics={"loss": float(loss.item())})
