"""The baseline of bench/recovery.py: the same training loop in a plain script under torchrun.

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc-per-node 2 \\
        --max-restarts 1 bench/recovery_plain.py DATA.npz OUT_FOLDER EPOCHS CHECKPOINT_EVERY

It checkpoints as a careful user would with torch alone (every rank's RNG gathered, rank 0
writes ``step-<n>.pt`` to a temporary name, fsyncs and renames it, keeps the last two) and, on
start, resumes from the newest one (``torch.load(weights_only=True)``), skipping the batches
already done: what torchrelay's context does for its training functions.
"""

from __future__ import annotations

import io
import os
import re
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from plain_ddp import DigitsNet
from recovery_trainer import STEP_PAUSE_S, digest, first_step, started
from torch import nn
from torch.nn.parallel import DistributedDataParallel

KEEP = 2
_NAME = re.compile(r"^step-(\d+)\.pt$")


def newest(folder: Path) -> tuple[int, dict[str, Any]] | None:
    steps = sorted(int(m[1]) for p in folder.iterdir() if (m := _NAME.match(p.name)))
    if not steps:
        return None
    state = torch.load(folder / f"step-{steps[-1]}.pt", map_location="cpu", weights_only=True)
    return steps[-1], state


def save(folder: Path, step: int, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    temporary = folder / f".step-{step}.pt.tmp"
    with temporary.open("wb") as handle:
        handle.write(buffer.getvalue())
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(folder / f"step-{step}.pt")
    steps = sorted(int(m[1]) for p in folder.iterdir() if (m := _NAME.match(p.name)))
    for old in steps[:-KEEP]:
        (folder / f"step-{old}.pt").unlink(missing_ok=True)


def checkpoint(folder: Path, state: dict[str, Any], rank: int, world: int) -> None:
    """Every rank's RNG gathered, rank 0 writes, everyone waits for it (collective)."""
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, torch.get_rng_state())
    if rank == 0:
        save(folder, state["step"], {**state, "rng": gathered})
    dist.barrier()


def main() -> None:
    data_path, out_arg, epochs_arg, every_arg = sys.argv[1:5]
    out, epochs, every = Path(out_arg), int(epochs_arg), int(every_arg)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    folder = out / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(7)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    with np.load(data_path, allow_pickle=False) as data:
        x = torch.from_numpy(data["x"]).float().div(16.0).unsqueeze(1)
        y = torch.from_numpy(data["y"]).long()
    restored = newest(folder)
    model = DigitsNet()
    step = epoch = position = 0
    if restored is not None:
        step, state = restored
        epoch, position = state["epoch"], state["position"]
        model.load_state_dict(state["model"])
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=3e-3)
    if restored is not None:
        optimizer.load_state_dict(restored[1]["optimizer"])
        torch.set_rng_state(restored[1]["rng"][rank])
    started(out, attempt, rank, restored[0] if restored else None, digest(model.state_dict()))
    loss_fn = nn.CrossEntropyLoss()
    per_rank = len(x) // world
    usable = per_rank - per_rank % 32
    first = True
    while epoch < epochs:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(7 + epoch))
        batches = torch.split(order[rank : per_rank * world : world][:usable], 32)
        while position < len(batches):
            index = batches[position]
            optimizer.zero_grad()
            loss_fn(ddp(x[index]), y[index]).backward()
            optimizer.step()
            step, position = step + 1, position + 1
            if step % every == 0:
                state = {"step": step, "epoch": epoch, "position": position}
                state |= {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
                checkpoint(folder, state, rank, world)
            if first and rank == 0:
                first_step(out, attempt)
            first = False
            time.sleep(STEP_PAUSE_S)
        epoch, position = epoch + 1, 0
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
