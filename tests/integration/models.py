"""A real exported digits model for serving tests: trained briefly through the local backend."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from torchrelay.services.ingest.fill import fill_for
from torchrelay.services.ingest.settings import IngestOptions
from torchrelay.services.ingest.staging import Stager, StageRequest
from torchrelay.shared.cluster import Status, WorkerJob
from torchrelay.shared.cluster.local import LocalBackend
from torchrelay.shared.events.data import DatasetRef, TrainJobSpec
from torchrelay.shared.storage import Layout


async def train_digits(root: Path, run_id: str, *, epochs: int = 3, seed: int = 0) -> Path:
    """Stage the digits and train them; returns the model version's folder."""
    staged = await Stager(root, IngestOptions().limits()).stage(
        StageRequest(f"req-{run_id}", "digits", "sklearn:digits"),
        fill_for("sklearn:digits", IngestOptions()),
    )
    backend = LocalBackend(max_world_size=1)
    job = WorkerJob(
        run_id=run_id,
        attempt=0,
        job=TrainJobSpec(
            dataset=DatasetRef(name="digits", version=staged.manifest.version),
            entrypoint="torchrelay.services.train.examples.digits:train",
            world_size=1,
            model_name="digits",
            seed=seed,
            hyperparameters={"epochs": epochs},
        ),
        dataset_path=staged.path,
        storage_root=str(root),
    )
    ended = await backend.wait(await backend.schedule(backend.dryrun(job)))
    await backend.aclose()
    if ended.status is not Status.SUCCEEDED:
        raise RuntimeError(f"training the test model failed: {ended}")
    return Layout(root).model("digits", run_id)


class ModelServer:
    """``python -m torchrelay.services.serve.server`` as a child process."""

    def __init__(self, model_dir: Path, log: Path, *args: str) -> None:
        self.log = log
        self._handle = log.open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torchrelay.services.serve.server",
                "--model-dir",
                str(model_dir),
                *args,
            ],
            stdout=self._handle,
            stderr=subprocess.STDOUT,
        )
        self.port = 0

    def wait_ready(self, timeout_s: float = 60) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.log.read_text().splitlines():
                if '"model.ready"' in line:
                    self.port = int(json.loads(line)["port"])
                    return self.port
            if self.process.poll() is not None:
                raise RuntimeError(f"model server exited: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError("model server did not become ready")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._handle.close()


__all__ = ["ModelServer", "asyncio", "train_digits"]
