"""What the CLI does against a running platform: submit and follow pipelines, show status,
send an inference."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import yaml

from torchrelay.shared.bus.connection import NatsSettings, connect
from torchrelay.shared.bus.jetstream import JetStreamBus
from torchrelay.shared.events import PipelineSubmitted
from torchrelay.shared.events.data import PipelineSpec, PipelineSubmittedData
from torchrelay.shared.pipelines import STAGES, PipelineRecord, pipeline_key
from torchrelay.shared.state import State

DEMO = {
    "name": "digits-demo",
    "dataset": {"name": "digits", "source": "sklearn:digits"},
    "training": {
        "entrypoint": "torchrelay.services.train.examples.digits:train",
        "model_name": "digits",
        "world_size": 2,
        "seed": 0,
        "checkpoint_every_steps": 50,
        "hyperparameters": {"epochs": 30},
    },
    "deploy": {"enabled": True, "replicas": 2},
}


def load_spec(path: Path) -> PipelineSpec:
    text = path.read_text()
    raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    return PipelineSpec.model_validate(raw)


class Client:
    def __init__(self, bus: JetStreamBus, state: State) -> None:
        self.bus = bus
        self.pipelines = state.store("pipelines", PipelineRecord)

    @classmethod
    async def connect(cls, nats_url: str) -> Client:
        nc = await connect(NatsSettings(url=nats_url, startup_wait_s=10))
        bus = JetStreamBus(nc, source="/torchrelay/cli")
        await bus.ensure_stream()
        return cls(bus, await State.open(nc.jetstream()))

    async def aclose(self) -> None:
        await self.bus.aclose()

    async def submit(self, spec: PipelineSpec) -> str:
        pipeline_id = f"{spec.name}-{uuid.uuid4().hex[:8]}"
        await self.bus.publish(
            PipelineSubmitted(
                source="/torchrelay/cli",
                subject=spec.name,
                pipelineid=pipeline_id,
                data=PipelineSubmittedData(spec=spec),
            )
        )
        return pipeline_id

    async def record(self, pipeline_id: str) -> PipelineRecord | None:
        item = await self.pipelines.get(pipeline_key(pipeline_id))
        return item.value if item else None

    async def records(self) -> list[PipelineRecord]:
        return [item.value for item in await self.pipelines.items()]

    async def wait(
        self, pipeline_id: str, *, timeout_s: float, show: bool = True
    ) -> PipelineRecord:
        """Follow a pipeline to its end, printing each stage change and training progress."""
        seen: dict[str, str] = {}
        progress = await self.bus.nc.subscribe(
            "torchrelay.train.progress", cb=_progress(pipeline_id, show)
        )
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                record = await self.record(pipeline_id)
                if record is not None:
                    for name in STAGES:
                        stage = record.stages[name]
                        if show and seen.get(name) != stage.status:
                            seen[name] = stage.status
                            note = stage.reason or _short(stage.detail)
                            print(f"  {name:7s} {stage.status:9s} {note}", flush=True)  # noqa: T201
                    if record.status != "running":
                        return record
                await asyncio.sleep(0.25)
        finally:
            await progress.unsubscribe()
        raise TimeoutError(f"pipeline {pipeline_id} did not finish in {timeout_s}s")


def _short(detail: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in detail.items() if not isinstance(v, dict))


def _progress(pipeline_id: str, show: bool) -> Callable[[Any], Awaitable[None]]:
    last = [0.0]

    async def on_message(msg: Any) -> None:
        try:
            event = json.loads(msg.data)
        except ValueError:
            return
        if not show or event.get("pipelineid") != pipeline_id or time.monotonic() - last[0] < 1:
            return
        last[0] = time.monotonic()
        data = event.get("data", {})
        print(  # noqa: T201
            f"          step {data.get('step')} epoch {data.get('epoch')} "
            f"loss {data.get('loss', 0):.4f} {data.get('samples_per_s', 0):.0f} samples/s",
            flush=True,
        )

    return on_message


def timing(record: PipelineRecord) -> dict[str, Any]:
    """Each stage's duration and the platform's own overhead, for `status`."""
    stages = {
        name: {
            "status": stage.status,
            "seconds": stage.seconds,
            "reason": stage.reason,
            "detail": stage.detail,
        }
        for name, stage in record.stages.items()
    }
    return {
        "pipeline_id": record.pipeline_id,
        "name": record.spec.name,
        "status": record.status,
        "submitted": record.submitted.isoformat(),
        "stages": stages,
        "overhead_seconds": record.overhead_s(),
    }


async def predict(endpoint: str, sample: np.ndarray[Any, Any]) -> list[float]:
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": list(sample.shape),
                "datatype": "FP32",
                "data": sample.astype(np.float32).ravel().tolist(),
            }
        ]
    }
    async with aiohttp.ClientSession() as http, http.post(f"{endpoint}/infer", json=body) as r:
        answer = await r.json()
        if r.status != 200:
            raise RuntimeError(f"inference failed: HTTP {r.status} {answer}")
    scores: list[float] = answer["outputs"][0]["data"]
    return scores
