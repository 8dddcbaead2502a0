"""The baseline for bench/train.py: the digits CNN in a plain torch DDP script, no torchrelay.

    python bench/plain_ddp.py RANK WORLD_SIZE RENDEZVOUS_FILE DATA.npz EPOCHS OUT.json

Same model, data split, batch size, optimizer and per-epoch shuffle as the torchrelay example.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class DigitsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(32 * 4 * 4, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


def main() -> None:
    rank, world, rendezvous, data_path, epochs, out = sys.argv[1:7]
    rank_i, world_i, epochs_i = int(rank), int(world), int(epochs)
    torch.manual_seed(7)
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank_i, world_size=world_i,
        timeout=timedelta(seconds=120),
    )  # fmt: skip
    with np.load(data_path, allow_pickle=False) as data:
        x = torch.from_numpy(data["x"]).float().div(16.0).unsqueeze(1)
        y = torch.from_numpy(data["y"]).long()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = int(len(x) * 0.8)
    x_train, y_train = x[order[:cut]], y[order[:cut]]
    model = DistributedDataParallel(DigitsNet())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    batch_size = 32
    per_rank = len(x_train) // world_i
    usable = per_rank - per_rank % batch_size
    first: float | None = None
    last = 0.0
    samples = 0
    for epoch in range(epochs_i):
        shuffled = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(7 + epoch))
        mine = shuffled[rank_i : per_rank * world_i : world_i][:usable]
        for index in torch.split(mine, batch_size):
            optimizer.zero_grad()
            loss = loss_fn(model(x_train[index]), y_train[index])
            loss.backward()
            optimizer.step()
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                samples += len(index) * world_i
            last = now
    if rank_i == 0:
        elapsed = last - (first or last)
        with open(out, "w") as handle:  # noqa: PTH123 - a plain script, on purpose
            json.dump({"samples_per_s": samples / elapsed if elapsed else 0.0}, handle)
    dist.barrier()  # nobody tears the group down while a peer still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
