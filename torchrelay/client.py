"""What the CLI does against a running platform: submit and follow pipelines, show status,
send an inference."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import yaml

from torchrelay.services.serve.domain import DeploymentRecord
from torchrelay.services.train.domain import ModelRecord
from torchrelay.shared.bus.connection import NatsSettings, connect
from torchrelay.shared.bus.jetstream import JetStreamBus
from torchrelay.shared.events import PipelineSubmitted
from torchrelay.shared.events.data import PipelineSpec, PipelineSubmittedData, TrainFailedData
from torchrelay.shared.pipelines import (
    STAGES,
    PipelineRecord,
    Submission,
    conflict_reason,
    judge_submission,
    pipeline_key,
)
from torchrelay.shared.runs import RunRecord
from torchrelay.shared.state import KvState, State, key_part

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


class PipelineRefused(Exception):
    """The platform refused a submission: its pipeline id already holds another spec."""

    def __init__(self, pipeline_id: str, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.pipeline_id = pipeline_id
        self.code = code
        self.reason = reason


def refusal(record: PipelineRecord, submitted: PipelineSubmitted) -> PipelineRefused | None:
    """Ingest's refusal of ``submitted`` given the stored ``record`` (the same rule it
    applies), or None: a pipeline id that holds another spec is not this submission's."""
    verdict = judge_submission(record, submitted.id, submitted.data.spec)
    if verdict is not Submission.CONFLICTING:
        return None
    reason = conflict_reason(record, submitted.data.spec)
    return PipelineRefused(record.pipeline_id, verdict.value, reason)


PIPELINE_ENDS = frozenset({"succeeded", "failed"})


def finished(record: PipelineRecord) -> bool:
    """Whether ``record`` shows how its pipeline ended, so :meth:`Client.wait` may stop.

    Only a terminal status counts: stages only move forward, and a failed training attempt
    that will be restarted (a crash, or the monitor's cancel of a stalled attempt) marks
    nothing failed, so a terminal status is the pipeline's last; anything else is followed on.
    """
    return record.status in PIPELINE_ENDS


class Client:
    def __init__(self, bus: JetStreamBus, state: State) -> None:
        self.bus = bus
        self._submitted: dict[str, PipelineSubmitted] = {}
        self.pipelines = state.store("pipelines", PipelineRecord)
        self.runs = state.store("runs", RunRecord)
        self.models = state.store("models", ModelRecord)
        self.deployments = state.store("deployments", DeploymentRecord)

    @classmethod
    async def connect(cls, nats_url: str) -> Client:
        nc = await connect(NatsSettings(url=nats_url, startup_wait_s=10))
        bus = JetStreamBus(nc, source="/torchrelay/cli")
        await bus.ensure_stream()
        return cls(bus, await KvState.open(nc.jetstream()))

    async def aclose(self) -> None:
        await self.bus.aclose()

    async def submit(self, spec: PipelineSpec, *, pipeline_id: str | None = None) -> str:
        """Publish ``pipeline.submitted``; the pipeline id is fresh unless one is given."""
        pipeline_id = pipeline_id or f"{spec.name}-{uuid.uuid4().hex[:8]}"
        event = PipelineSubmitted(
            source="/torchrelay/cli",
            subject=spec.name,
            pipelineid=pipeline_id,
            data=PipelineSubmittedData(spec=spec),
        )
        await self.bus.publish(event)
        self._submitted[pipeline_id] = event
        return pipeline_id

    async def record(self, pipeline_id: str) -> PipelineRecord | None:
        item = await self.pipelines.get(pipeline_key(pipeline_id))
        return item.value if item else None

    async def records(self) -> list[PipelineRecord]:
        return [item.value for item in await self.pipelines.items()]

    async def run(self, run_id: str) -> RunRecord | None:
        item = await self.runs.get(key_part(run_id))
        return item.value if item else None

    async def deployment(self, model: str) -> DeploymentRecord | None:
        item = await self.deployments.get(key_part(model))
        return item.value if item else None

    async def inventory(self) -> Inventory:
        return Inventory(
            pipelines=sorted(await self.records(), key=lambda r: r.submitted),
            runs=sorted((i.value for i in await self.runs.items()), key=lambda r: r.updated),
            models=sorted((i.value for i in await self.models.items()), key=lambda m: m.created),
            deployments=[i.value for i in await self.deployments.items()],
        )

    async def wait(
        self, pipeline_id: str, *, timeout_s: float, show: bool = True
    ) -> PipelineRecord:
        """Follow a pipeline to its end (see :func:`finished`), printing each stage change and
        training progress. The record is followed with a KV watch, so a change shows at once
        and an idle wait sends nothing; :class:`TimeoutError` after ``timeout_s``.

        Raises :class:`PipelineRefused` when this client submitted ``pipeline_id`` and the
        platform refused it (the id holds another spec), rather than following that pipeline.
        """
        submitted = self._submitted.get(pipeline_id)
        seen: dict[str, str] = {}
        progress = await self.bus.nc.subscribe(
            "torchrelay.train.progress", cb=_progress(pipeline_id, show)
        )
        deadline = asyncio.timeout(timeout_s)
        try:
            async with deadline, self.pipelines.watch_key(pipeline_key(pipeline_id)) as updates:
                # The record as it is now, then after each write: no polling.
                async for item in updates:
                    if item is None:  # not recorded yet (or no more)
                        continue
                    record = item.value
                    refused = refusal(record, submitted) if submitted else None
                    if refused is not None:
                        if show:
                            print(f"  refused {refused}", flush=True)  # noqa: T201
                        raise refused
                    for name in STAGES:
                        stage = record.stages[name]
                        if show and seen.get(name) != stage.status:
                            seen[name] = stage.status
                            note = stage.reason or _short(stage.detail)
                            print(f"  {name:7s} {stage.status:9s} {note}", flush=True)  # noqa: T201
                    if finished(record):
                        return record
        except TimeoutError:
            if not deadline.expired():
                raise
            raise TimeoutError(f"pipeline {pipeline_id} did not finish in {timeout_s}s") from None
        finally:
            await progress.unsubscribe()
        raise ConnectionError(f"the watch of pipeline {pipeline_id} ended before it finished")


def train_run_id(pipeline_id: str) -> str:
    """The run id of a pipeline's training stage."""
    return f"{pipeline_id}.train"


_MESSAGE_LINES = 10


def failure_report(record: PipelineRecord, run: RunRecord | None) -> list[str]:
    """Why a pipeline did not succeed, as lines for a person: the stage that failed and its
    reason; for a training stage, the exception the code raised (type and message) and the
    end of its traceback, or the failed rank's last log lines when it raised none (a signal).
    ``run`` is the pipeline's training run (None: none was recorded)."""
    failed = [name for name in STAGES if record.stages[name].status == "failed"]
    if not failed:
        return [f"pipeline {record.pipeline_id} {record.status}: no stage says why"]
    name = failed[0]
    lines = [
        f"pipeline {record.pipeline_id} failed at its {name} stage: "
        f"{record.stages[name].reason or 'no reason recorded'}"
    ]
    outcome = run.outcome if run is not None else None
    if name != "train" or not isinstance(outcome, TrainFailedData):
        return lines
    where = f"rank {outcome.rank}, " if outcome.rank is not None else ""
    if outcome.error_type is not None:
        message = (outcome.error_message or "").splitlines() or [""]
        shown = message[:_MESSAGE_LINES] + (["..."] if len(message) > _MESSAGE_LINES else [])
        lines.append(f"  {outcome.error_type}: {shown[0]}".rstrip())
        lines.extend(f"    {line}" for line in shown[1:])
        if outcome.log_tail:
            lines.append(f"  traceback ({where}attempt {outcome.attempt}), last lines:")
    elif outcome.log_tail:
        lines.append(f"  last log lines ({where}attempt {outcome.attempt}):")
    lines.extend(f"    {line}" for line in outcome.log_tail)
    return lines


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


@dataclass(frozen=True)
class Inventory:
    """Everything the platform records, for `torchrelay status`."""

    pipelines: list[PipelineRecord]
    runs: list[RunRecord]
    models: list[ModelRecord]
    deployments: list[DeploymentRecord]

    def rows(self) -> dict[str, list[dict[str, Any]]]:
        """Each kind as table rows, linked: dataset -> run -> model -> deployment."""
        serving = {d.model: d.active_version for d in self.deployments if d.status == "deployed"}
        return {
            "pipelines": [lineage(p) for p in self.pipelines],
            "runs": [
                {
                    "run": r.run_id,
                    "status": r.status,
                    "attempt": r.attempt,
                    "dataset": f"{r.spec.dataset.name}@{r.spec.dataset.version}",
                    "model": f"{r.spec.model_name}@{r.model_version}" if r.model_version else "",
                    "pipeline": r.pipeline_id or "",
                    "replica": r.owner,
                }
                for r in self.runs
            ],
            "models": [
                {
                    "model": f"{m.name}@{m.version}",
                    "serving": "yes" if serving.get(m.name) == m.version else "",
                    "metrics": " ".join(f"{k}={v:.4g}" for k, v in m.metrics.items()),
                    "run": m.run_id,
                    "dataset": m.dataset,
                    "pipeline": m.pipeline_id or "",
                }
                for m in self.models
            ],
            "deployments": [
                {
                    "model": d.model,
                    "status": d.status,
                    "version": d.active_version or "",
                    "previous": d.previous_version or "",
                    "endpoint": d.endpoint or "",
                    "replica": d.owner or "",
                    "reason": d.reason or "",
                }
                for d in self.deployments
            ],
        }


def lineage(record: PipelineRecord) -> dict[str, Any]:
    ingest, train, deploy = (record.stages[name].detail for name in ("ingest", "train", "deploy"))
    dataset = f"{ingest['dataset']}@{ingest['version']}" if "version" in ingest else ""
    model = f"{train['model']}@{train['version']}" if "version" in train else ""
    return {
        "pipeline": record.pipeline_id,
        "status": record.status,
        "submitted": record.submitted.strftime("%Y-%m-%d %H:%M:%S"),
        "dataset": dataset,
        "run": f"{record.pipeline_id}.train" if record.stages["train"].status != "pending" else "",
        "model": model,
        "endpoint": deploy.get("endpoint", ""),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Rows as aligned text columns, headed by their keys."""
    if not rows:
        return "  (none)"
    columns = list(rows[0])
    cells = [[c.upper() for c in columns]] + [[str(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  "
        + "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    )


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


async def predict(endpoint: str, sample: np.ndarray[Any, Any]) -> dict[str, Any]:
    """One V2 inference of ``sample`` (with its batch dimension) at a model's endpoint; the
    input's name and datatype come from the model's own metadata."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        async with http.get(endpoint) as r:
            metadata = await r.json(content_type=None)
            if r.status != 200:
                raise RuntimeError(f"{endpoint} answered HTTP {r.status}: {metadata}")
        declared = metadata["inputs"][0]
        body = {"inputs": [_tensor(declared["name"], declared["datatype"], sample)]}
        async with http.post(f"{endpoint}/infer", json=body) as r:
            answer: dict[str, Any] = await r.json(content_type=None)
            if r.status != 200:
                raise RuntimeError(f"inference failed: HTTP {r.status} {answer}")
    return answer


_NUMPY = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


def _tensor(name: str, datatype: str, sample: np.ndarray[Any, Any]) -> dict[str, Any]:
    kind = _NUMPY.get(datatype)
    if kind is None:
        raise ValueError(f"the model takes {datatype}; predict sends {sorted(_NUMPY)}")
    return {
        "name": name,
        "shape": list(sample.shape),
        "datatype": datatype,
        "data": sample.astype(kind).ravel().tolist(),
    }


def load_input(path: Path) -> np.ndarray[Any, Any]:
    """An input batch from ``.npy``, or from ``.json`` holding a (nested) list of numbers."""
    if path.suffix not in (".npy", ".json"):
        raise ValueError(f"{path}: give a .npy file or a .json list of numbers")
    try:
        if path.suffix == ".npy":
            array: np.ndarray[Any, Any] = np.load(path, allow_pickle=False)
        else:
            array = np.asarray(json.loads(path.read_text()), dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read an input from {path}: {exc}") from exc
    if array.ndim == 0 or array.dtype.kind not in "biuf":
        raise ValueError(f"{path}: the input must be a numeric array, not {array.dtype}")
    return array
