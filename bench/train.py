"""Training benchmark: the digits trainer under torchrelay against a plain torch DDP script.

    python bench/train.py [--epochs 30] [--world-size 2] [--rounds 3] [--checkpoint-every 50]

Both run the same model, data, batch size and world size as local processes on CPU (gloo,
OMP_NUM_THREADS=1), alternating, so drift on a noisy machine hits both. Samples/s is measured
inside each job from its first to its last step (process start-up is not counted for either);
torchrelay checkpoints every ``--checkpoint-every`` steps and reports how long they stalled
training.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torchrelay.services.ingest.fill import fill_for
from torchrelay.services.ingest.settings import IngestOptions
from torchrelay.services.ingest.staging import Stager, StageRequest
from torchrelay.shared.cluster import Status, WorkerJob
from torchrelay.shared.cluster.local import LocalBackend
from torchrelay.shared.events.data import DatasetRef, TrainJobSpec

PLAIN = Path(__file__).with_name("plain_ddp.py")


def plain(data: Path, world: int, epochs: int, work: Path, round_: int) -> float:
    rendezvous = work / f"plain-rdzv-{round_}"
    out = work / f"plain-{round_}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                str(PLAIN),
                str(rank),
                str(world),
                str(rendezvous),
                str(data),
                str(epochs),
                str(out),
            ],
            env=env,
        )
        for rank in range(world)
    ]
    codes = [p.wait() for p in processes]
    if any(codes):
        raise RuntimeError(f"the plain script failed with exit codes {codes}")
    return float(json.loads(out.read_text())["samples_per_s"])


async def torchrelay(
    backend: LocalBackend,
    root: Path,
    staged: tuple[str, str],
    args: argparse.Namespace,
    round_: int,
) -> dict[str, float]:
    path, version = staged
    run_id = f"bench-{round_}-{time.time_ns()}"
    job = WorkerJob(
        run_id=run_id,
        attempt=0,
        job=TrainJobSpec(
            dataset=DatasetRef(name="digits", version=version),
            entrypoint="torchrelay.services.train.examples.digits:train",
            world_size=args.world_size,
            model_name="bench",
            seed=7,
            checkpoint_every_steps=args.checkpoint_every,
            keep_checkpoints=2,
            hyperparameters={"epochs": args.epochs},
        ),
        dataset_path=path,
        storage_root=str(root),
    )
    ended = await backend.wait(await backend.schedule(backend.dryrun(job)))
    if ended.status is not Status.SUCCEEDED:
        raise RuntimeError(f"torchrelay run failed: {ended}")
    result = json.loads((root / "runs" / run_id / "result.json").read_text())
    throughput: dict[str, float] = result["throughput"]
    return throughput


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        staged = await Stager(work, IngestOptions().limits()).stage(
            StageRequest("bench", "digits", "sklearn:digits"),
            fill_for("sklearn:digits", IngestOptions()),
        )
        data = work / staged.path / "data" / "digits.npz"
        backend = LocalBackend(max_world_size=args.world_size)
        plain_rates, ours = [], []
        for round_ in range(args.rounds):
            plain_rates.append(plain(data, args.world_size, args.epochs, work, round_))
            ours.append(
                await torchrelay(
                    backend, work, (staged.path, staged.manifest.version), args, round_
                )
            )
        await backend.aclose()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plain_median = statistics.median(plain_rates)
    ours_median = statistics.median(r["samples_per_s"] for r in ours)
    stalls = [r["checkpoint_seconds"] / r["checkpoints"] * 1e3 for r in ours if r["checkpoints"]]
    print(f"plain DDP   samples/s per round: {', '.join(f'{r:.0f}' for r in plain_rates)}")
    ours_rates = [r["samples_per_s"] for r in ours]
    print(f"torchrelay  samples/s per round: {', '.join(f'{r:.0f}' for r in ours_rates)}")
    print(
        f"median: plain {plain_median:.0f}, torchrelay {ours_median:.0f} "
        f"= {ours_median / plain_median:.3f}x (target >= 0.95)"
    )
    print(
        f"checkpoints every {args.checkpoint_every} steps: "
        f"{ours[0]['checkpoints']:.0f} per run, {statistics.median(stalls):.1f} ms each (median)"
    )


if __name__ == "__main__":
    asyncio.run(main())
