"""Pipeline benchmark: the demo pipeline end to end on the local platform.

    python bench/pipeline.py [--runs 3] [--workspace-files 200]

Reports, per run: total time (submit to deployed), the training stage, and the platform's own
gaps between stages (submission to staging, staged to training, trained to rollout), which
issue 14 wants under 1.2 s. With ``--workspace-files N`` every run is done twice on the same
platform: the bundled demo, and the same training from a user's workspace of N small files,
staged as ``torchrelay submit`` stages it (packing and upload timed apart: they happen before
the submission, on the user's side).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torchrelay import platform, specfile
from torchrelay.client import DEMO, Client
from torchrelay.shared.events.data import PipelineSpec

WRAPPER = """from torchrelay.services.train.examples import digits


def train(ctx):
    digits.train(ctx)
"""


def workspace_project(folder: Path, files: int) -> Path:
    """A user's project: a spec naming a workspace of ``files`` files (the entrypoint's module
    and small helper modules), training the demo's model."""
    code = folder / "src"
    (code / "helpers").mkdir(parents=True)
    (code / "bench_model.py").write_text(WRAPPER)
    for index in range(files - 1):
        (code / "helpers" / f"h{index:04d}.py").write_text(f"VALUE = {index}\n" * 20)
    training = {**DEMO["training"], "workspace": "src", "entrypoint": "bench_model:train"}
    spec = {**DEMO, "name": "digits-ws", "training": training}
    path = folder / "pipeline.json"
    path.write_text(json.dumps(spec))
    return path


async def run(
    nats_url: str, ingest_url: str, runs: int, project: Path | None
) -> list[dict[str, float | str]]:
    client = await Client.connect(nats_url)
    rows: list[dict[str, float | str]] = []
    variants: list[Path | None] = [None] if project is None else [None, project]
    try:
        for _ in range(runs):
            for variant in variants:
                rows.append(await one(client, ingest_url, variant))
    finally:
        await client.aclose()
    return rows


async def one(client: Client, ingest_url: str, project: Path | None) -> dict[str, float | str]:
    upload_s = 0.0
    if project is None:
        spec = PipelineSpec.model_validate(DEMO)
    else:
        began = time.perf_counter()
        spec = await specfile.prepare(project, lambda: specfile.Uploader(ingest_url), print)
        upload_s = time.perf_counter() - began
    started = time.perf_counter()
    pipeline_id = await client.submit(spec)
    record = await client.wait(pipeline_id, timeout_s=600, show=False)
    total = time.perf_counter() - started
    if record.status != "succeeded":
        raise RuntimeError(f"{pipeline_id} {record.status}")
    return {
        "variant": "demo" if project is None else "workspace",
        "upload_s": upload_s,
        "total_s": total,
        "staging_s": record.stages["ingest"].seconds or 0.0,
        "training_s": record.stages["train"].seconds or 0.0,
        "rollout_s": record.stages["deploy"].seconds or 0.0,
        "gaps_s": record.overhead_s() or 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--workspace-files", type=int, default=0, help="also run from a workspace of N files"
    )
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    project = (
        workspace_project(state / "project", args.workspace_files) if args.workspace_files else None
    )
    started = platform.start(state / "platform")
    ingest_url = str(started.describe()["services"]["ingest-0"]["url"])
    try:
        rows = asyncio.run(
            run(
                platform.client_url(state / "platform", started.nats_url),
                ingest_url,
                args.runs,
                project,
            )
        )
    finally:
        platform.stop(started)
        shutil.rmtree(state, ignore_errors=True)
    for index, row in enumerate(rows, start=1):
        print(
            f"run {index} ({row['variant']}): total {row['total_s']:.2f}s"
            f" = staging {row['staging_s']:.2f}s + training {row['training_s']:.2f}s"
            f" + rollout {row['rollout_s']:.2f}s + gaps {row['gaps_s']:.3f}s"
            f"; workspace packed and uploaded before submitting in {row['upload_s']:.3f}s"
        )
    for variant in sorted({str(row["variant"]) for row in rows}):
        gaps = [float(row["gaps_s"]) for row in rows if row["variant"] == variant]
        print(f"{variant}: largest sum of gaps between stages {max(gaps):.3f}s (target < 1.2 s)")


if __name__ == "__main__":
    main()
