"""Pipeline benchmark: the demo pipeline end to end on the local platform.

    python bench/pipeline.py [--runs 3]

Reports, per run: total time (submit to deployed), the training stage, and the platform's own
gaps between stages (submission to staging, staged to training, trained to rollout): the sum
that the issue wants under 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torchrelay import platform
from torchrelay.client import DEMO, Client
from torchrelay.shared.events.data import PipelineSpec


async def run(nats_url: str, runs: int) -> list[dict[str, float]]:
    client = await Client.connect(nats_url)
    rows = []
    try:
        for _ in range(runs):
            started = time.perf_counter()
            pipeline_id = await client.submit(PipelineSpec.model_validate(DEMO))
            record = await client.wait(pipeline_id, timeout_s=600, show=False)
            total = time.perf_counter() - started
            if record.status != "succeeded":
                raise RuntimeError(f"{pipeline_id} {record.status}")
            rows.append(
                {
                    "total_s": total,
                    "staging_s": record.stages["ingest"].seconds or 0.0,
                    "training_s": record.stages["train"].seconds or 0.0,
                    "rollout_s": record.stages["deploy"].seconds or 0.0,
                    "gaps_s": record.overhead_s() or 0.0,
                }
            )
    finally:
        await client.aclose()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    started = platform.start(state)
    try:
        rows = asyncio.run(run(platform.client_url(state, started.nats_url), args.runs))
    finally:
        platform.stop(started)
        shutil.rmtree(state, ignore_errors=True)
    for index, row in enumerate(rows, start=1):
        print(
            f"run {index}: total {row['total_s']:.2f}s = staging {row['staging_s']:.2f}s"
            f" + training {row['training_s']:.2f}s + rollout {row['rollout_s']:.2f}s"
            f" + gaps {row['gaps_s']:.3f}s"
        )
    worst = max(row["gaps_s"] for row in rows)
    print(f"largest sum of gaps between stages: {worst:.3f}s (target < 2 s)")


if __name__ == "__main__":
    main()
