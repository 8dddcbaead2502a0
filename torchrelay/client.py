"""The Python client API, what the CLI does against a running platform: submit and follow
pipelines (:class:`Client`), show status, send an inference (:func:`predict`), read a run's
history (:func:`run_history`). A notebook or script finds or starts the local platform with
:func:`torchrelay.platform.find_or_start`; ``examples/quickstart.ipynb`` uses all of it."""

from __future__ import annotations

import asyncio
import collections
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
import numpy as np
from nats.js.api import ConsumerConfig, DeliverPolicy

from torchrelay.services.ingest.handlers import VERSIONS, VersionRecord
from torchrelay.services.serve.domain import UNDEPLOYED, DeploymentRecord, undeploy_target
from torchrelay.services.serve.server.protocol import read_model_parameters
from torchrelay.services.train.domain import ModelRecord, model_key
from torchrelay.shared.bus.connection import NatsSettings, connect
from torchrelay.shared.bus.jetstream import JetStreamBus
from torchrelay.shared.errors import Refused
from torchrelay.shared.events import (
    InvalidEvent,
    ModelDeployRequested,
    ModelRollbackRequested,
    ModelUndeployRequested,
    PipelineSubmitted,
    Pruned,
    PruneRequested,
    SweepCancelRequested,
    TrainCancelRequested,
)
from torchrelay.shared.events import (
    decode as decode_event,
)
from torchrelay.shared.events.data import (
    PRUNE_KINDS,
    ModelDeployRequestedData,
    ModelRollbackRequestedData,
    ModelUndeployRequestedData,
    PipelineSpec,
    PipelineSubmittedData,
    PrunedData,
    PruneKind,
    PruneRequestedData,
    SweepCancelRequestedData,
    TrainCancelRequestedData,
    TrainFailedData,
)
from torchrelay.shared.pipelines import (
    STAGES,
    PipelineRecord,
    Submission,
    conflict_reason,
    judge_submission,
    pipeline_key,
)
from torchrelay.shared.pipelines import train_run_id as train_run_id  # noqa: PLC0414 - public
from torchrelay.shared.runs import RunRecord
from torchrelay.shared.state import KvState, State, key_part
from torchrelay.shared.storage.files import InputPreprocessing
from torchrelay.shared.storage.layout import Layout, attempt_folder
from torchrelay.shared.sweep_state import (
    SWEEPS,
    TRIAL_STATUSES,
    SweepRecord,
    Trial,
    ranked,
    submission_refusal,
    sweep_key,
)

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
        self.state = state
        self._submitted: dict[str, PipelineSubmitted] = {}
        self.pipelines = state.store("pipelines", PipelineRecord)
        self.runs = state.store("runs", RunRecord)
        self.models = state.store("models", ModelRecord)
        self.deployments = state.store("deployments", DeploymentRecord)
        self.sweeps = state.store(SWEEPS, SweepRecord)

    @classmethod
    async def connect(cls, nats_url: str) -> Client:
        nc = await connect(NatsSettings(url=nats_url, startup_wait_s=10))
        bus = JetStreamBus(nc, source=SOURCE)
        await bus.ensure_stream()
        return cls(bus, await KvState.open(nc.jetstream()))

    async def aclose(self) -> None:
        await self.bus.aclose()

    async def submit(self, spec: PipelineSpec, *, pipeline_id: str | None = None) -> str:
        """Publish ``pipeline.submitted``; the pipeline id is fresh unless one is given.
        :class:`Refused` for a sweep that cannot run (ingest would refuse it)."""
        pipeline_id = pipeline_id or f"{spec.name}-{_fresh()}"
        refusal = submission_refusal(pipeline_id, spec)
        if refusal is not None:
            raise Refused(refusal.reason)
        event = PipelineSubmitted(
            source=SOURCE,
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

    async def cancel(self, ident: str, reason: str) -> str:
        """Ask train to stop a pipeline's training (a sweep: every trial), or a run; what was
        asked to stop (``run <id>`` or ``sweep <id>``), or :class:`Refused` saying why there
        is nothing to stop."""
        pipeline = await self.record(ident)
        run_id = cancellable_run(ident, pipeline)
        if pipeline is not None and pipeline.spec.sweep is not None:
            await self.bus.publish(
                SweepCancelRequested(
                    source=SOURCE,
                    subject=ident,
                    pipelineid=ident,
                    data=SweepCancelRequestedData(sweep_id=ident, reason=reason),
                )
            )
            return f"sweep {ident}"
        run = await self.run(run_id)
        if run is None:
            raise Refused(f"no pipeline or run named {ident!r}")
        if run.status != "running":
            raise Refused(f"run {run_id} already ended ({run.status}): nothing to cancel")
        await self.bus.publish(
            TrainCancelRequested(
                source=SOURCE,
                subject=run_id,
                pipelineid=run.pipeline_id,
                data=TrainCancelRequestedData(run_id=run_id, reason=reason),
            )
        )
        return f"run {run_id}"

    async def deploy(self, model: str, version: str, replicas: int) -> None:
        """Ask serve to roll ``version`` of ``model`` out; :class:`Refused` for a version no
        run exported."""
        if await self.models.get(model_key(model, version)) is None:
            versions = sorted(
                item.value.version for item in await self.models.items() if item.value.name == model
            )
            known = f"its versions: {', '.join(versions)}" if versions else "no versions"
            raise Refused(f"no version {version!r} of model {model!r} ({known})")
        await self.bus.publish(
            ModelDeployRequested(
                source=SOURCE,
                subject=model,
                data=ModelDeployRequestedData(model_name=model, version=version, replicas=replicas),
            )
        )

    async def rollback(self, model: str, to_version: str | None) -> None:
        """Ask serve to put an earlier version of a deployed model back; :class:`Refused` for
        a model that is not deployed."""
        deployment = await self.deployment(model)
        if deployment is not None and deployment.status == UNDEPLOYED:
            raise Refused(not_deployed(model, deployment, "nothing to roll back"))
        if deployment is None or deployment.active_version is None:
            raise Refused(f"model {model!r} is not deployed: nothing to roll back")
        if to_version is None and deployment.previous_version is None:
            raise Refused(
                f"model {model!r} serves its first version ({deployment.active_version}): "
                "name the version to go to with --to"
            )
        await self.bus.publish(
            ModelRollbackRequested(
                source=SOURCE,
                subject=model,
                data=ModelRollbackRequestedData(model_name=model, to_version=to_version),
            )
        )

    async def undeploy(self, model: str, reason: str) -> str:
        """Ask serve to take a model down (its servers and endpoint); the version that serves,
        or :class:`Refused` for a model that is not deployed."""
        if not 1 <= len(reason) <= 512:
            raise Refused(f"the reason has {len(reason)} characters: say why in 1 to 512")
        deployment = await self.deployment(model)
        version = None if deployment is None else undeploy_target(deployment)
        if version is None:
            raise Refused(not_deployed(model, deployment, "nothing to undeploy"))
        await self.bus.publish(
            ModelUndeployRequested(
                source=SOURCE,
                subject=model,
                data=ModelUndeployRequestedData(model_name=model, reason=reason),
            )
        )
        return version

    async def retry(self, pipeline_id: str) -> str:
        """Submit a pipeline that failed again, as it was specified, under a new id (its data
        and code are the versions it staged, so the same bytes are trained on)."""
        record = await self.record(pipeline_id)
        if record is None:
            raise Refused(f"no pipeline {pipeline_id}")
        if record.status != "failed":
            raise Refused(
                f"pipeline {pipeline_id} {record.status}, it did not fail: nothing to retry"
            )
        return await self.submit(record.spec, pipeline_id=f"{record.spec.name}-{_fresh()}")

    async def datasets(self) -> list[VersionRecord]:
        """Every staged dataset version, oldest first."""
        staged = self.state.store("datasets", VersionRecord)
        return sorted((i.value for i in await staged.items(VERSIONS)), key=lambda v: v.created)

    async def events(
        self, *, last: int, follow: bool, pipeline_id: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """The stream's events as JSON objects: the ``last`` ones (of ``pipeline_id`` only,
        when given), then, with ``follow``, each new one as it arrives."""
        js = self.bus.nc.jetstream()
        newest = (await js.stream_info(self.bus.settings.name)).state.last_seq
        # Of one pipeline, the last ones can lie anywhere: read from the start and keep them.
        start = 1 if pipeline_id else max(1, newest - last + 1)
        subscription = await js.subscribe(
            "torchrelay.>",
            stream=self.bus.settings.name,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
            ),
        )

        def wanted(message: Any) -> dict[str, Any] | None:
            try:
                event = json.loads(message.data)
            except ValueError:
                return None
            if not isinstance(event, dict):
                return None
            return event if pipeline_id in (None, event.get("pipelineid")) else None

        kept: collections.deque[dict[str, Any]] = collections.deque(maxlen=last)
        try:
            while newest >= start:  # what the stream held when asked: there, so no long wait
                try:
                    message = await subscription.next_msg(timeout=5)
                except TimeoutError:
                    break
                if (event := wanted(message)) is not None:
                    kept.append(event)
                if message.metadata.sequence.stream >= newest:
                    break
            for event in kept:
                yield event
            while follow:
                message = await subscription.next_msg(timeout=None)
                if (event := wanted(message)) is not None:
                    yield event
        finally:
            await subscription.unsubscribe()

    async def run(self, run_id: str) -> RunRecord | None:
        item = await self.runs.get(key_part(run_id))
        return item.value if item else None

    async def sweep(self, sweep_id: str) -> SweepRecord | None:
        """A sweep's trials and how each ended (the sweep id is its pipeline's); None before
        train planned them (the dataset is staged first) or for a pipeline without a sweep."""
        item = await self.sweeps.get(sweep_key(sweep_id))
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
        self,
        pipeline_id: str,
        *,
        timeout_s: float,
        show: bool = True,
        report: Report | None = None,
    ) -> PipelineRecord:
        """Follow a pipeline to its end (see :func:`finished`), telling ``report`` of each
        record change and of training progress (default: :class:`LineReport` when ``show``,
        else nothing). The record is followed with a KV watch, so a change shows at once and
        an idle wait sends nothing; :class:`TimeoutError` after ``timeout_s``.

        Raises :class:`PipelineRefused` when this client submitted ``pipeline_id`` and the
        platform refused it (the id holds another spec), rather than following that pipeline.
        """
        told = report or (LineReport() if show else Report())
        submitted = self._submitted.get(pipeline_id)

        async def on_progress(msg: Any) -> None:
            try:
                event = json.loads(msg.data)
            except ValueError:
                return
            if isinstance(event, dict) and event.get("pipelineid") == pipeline_id:
                data = event.get("data")
                if isinstance(data, dict):
                    told.progress(data)

        progress = await self.bus.nc.subscribe("torchrelay.train.progress", cb=on_progress)
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
                        told.refused(refused)
                        raise refused
                    told.record(record)
                    if finished(record):
                        return record
        except TimeoutError:
            if not deadline.expired():
                raise
            raise TimeoutError(f"pipeline {pipeline_id} did not finish in {timeout_s}s") from None
        finally:
            await progress.unsubscribe()
        raise ConnectionError(f"the watch of pipeline {pipeline_id} ended before it finished")

    async def prune(
        self,
        older_than_s: float,
        *,
        dry_run: bool = False,
        kinds: Sequence[PruneKind] | None = None,
        timeout_s: float = 300.0,
    ) -> PrunedData:
        """Ask the monitor to remove what is older than ``older_than_s`` (only ``kinds``,
        default all) and return its answer: what it removed (on a dry run: would remove), what
        it kept and why, bytes freed. :class:`TimeoutError` when no answer comes in time."""
        request = PruneRequested(
            source=SOURCE,
            data=PruneRequestedData(
                older_than_s=older_than_s,
                dry_run=dry_run,
                kinds=list(dict.fromkeys(kinds)) if kinds else list(PRUNE_KINDS),
            ),
        )
        answer: asyncio.Future[PrunedData] = asyncio.get_running_loop().create_future()

        async def on_message(msg: Any) -> None:
            try:
                event = decode_event(msg.data, subject=msg.subject)
            except InvalidEvent:
                return
            ours = isinstance(event, Pruned) and event.data.request_id == request.id
            if ours and not answer.done():
                answer.set_result(event.data)

        # Subscribed before the request goes out: the answer cannot come before we listen.
        answers = await self.bus.nc.subscribe(Pruned.nats_subject, cb=on_message)
        try:
            await self.bus.publish(request)
            async with asyncio.timeout(timeout_s):
                return await answer
        except TimeoutError:
            raise TimeoutError(
                f"no answer to prune request {request.id} in {timeout_s:g}s: is the monitor "
                "running? (a prune that started goes on; `torchrelay events` shows its answer)"
            ) from None
        finally:
            await answers.unsubscribe()


class Report:
    """What :meth:`Client.wait` tells as it follows a pipeline; this one tells no one."""

    def record(self, record: PipelineRecord) -> None:
        """The pipeline's record, as it is when following starts and after each change."""

    def progress(self, data: dict[str, Any]) -> None:
        """A ``train.progress`` event's data (step, epoch, loss, samples_per_s, metrics)."""

    def refused(self, refused: PipelineRefused) -> None:
        """The platform refused the submission being followed."""


class LineReport(Report):
    """A line per stage change, and a training progress line at most once a second: for logs,
    pipes and notebooks."""

    def __init__(self, write: Callable[[str], None] | None = None) -> None:
        self._write = write or (lambda line: print(line, flush=True))  # noqa: T201
        self._seen: dict[str, str] = {}
        self._last_progress = 0.0

    def record(self, record: PipelineRecord) -> None:
        for name in STAGES:
            stage = record.stages[name]
            if self._seen.get(name) != stage.status:
                self._seen[name] = stage.status
                note = stage.reason or _short(stage.detail)
                self._write(f"  {name:7s} {stage.status:9s} {note}")

    def progress(self, data: dict[str, Any]) -> None:
        if time.monotonic() - self._last_progress < 1:
            return
        self._last_progress = time.monotonic()
        self._write(progress_line(data))

    def refused(self, refused: PipelineRefused) -> None:
        self._write(f"  refused {refused}")


def loss_text(loss: object) -> str:
    """A reported loss for people: 4 decimals, or "nan" when it diverged (reported as null)."""
    return f"{loss:.4f}" if isinstance(loss, int | float) else "nan"


def progress_line(data: dict[str, Any]) -> str:
    """A ``train.progress`` event's data as one line."""
    return (
        f"          step {data.get('step')} epoch {data.get('epoch')} "
        f"loss {loss_text(data.get('loss'))} {data.get('samples_per_s', 0):.0f} samples/s"
    )


SOURCE = "/torchrelay/cli"


def _fresh() -> str:
    """The random part of a pipeline id the command line makes up."""
    return uuid.uuid4().hex[:8]


def event_line(event: dict[str, Any]) -> str:
    """One stream event on one line: time, type, pipeline, and its data's plain fields."""
    kind = str(event.get("type", "?")).removeprefix("io.torchrelay.")
    kind = kind.rsplit(".v", 1)[0] if ".v" in kind else kind
    raw = event.get("data")
    data: dict[str, Any] = raw if isinstance(raw, dict) else {}
    fields = " ".join(
        f"{key}={_log_value(value)}"
        for key, value in data.items()
        if isinstance(value, str | int | float | bool) and key != "log_tail"
    )
    when = str(event.get("time", ""))[:19].replace("T", " ")
    return f"{when} {kind:24s} {event.get('pipelineid') or '-':24s} {fields}".rstrip()


def not_deployed(model: str, deployment: DeploymentRecord | None, what: str) -> str:
    """Why a request about a deployed model is refused: never deployed, or undeployed (and
    how to bring it back)."""
    if deployment is not None and deployment.status == UNDEPLOYED:
        back = deployment.previous_version
        hint = f"; `torchrelay deploy {model} {back}` brings it back" if back else ""
        return f"model {model!r} was undeployed: {what}{hint}"
    return f"model {model!r} is not deployed: {what}"


def cancellable_run(ident: str, pipeline: PipelineRecord | None) -> str:
    """The run a cancel of ``ident`` is about: a pipeline's training run (:class:`Refused`
    when the pipeline has ended or is not training), else ``ident`` itself as a run id."""
    if pipeline is None:
        return ident
    if pipeline.status != "running":
        raise Refused(f"pipeline {ident} already ended ({pipeline.status}): nothing to cancel")
    stage = pipeline.stages["train"]
    if stage.status != "running":
        current = next((n for n in STAGES if pipeline.stages[n].status == "running"), "ingest")
        raise Refused(
            f"pipeline {ident} is in its {current} stage, not training: only training is "
            "cancelled (it ends with the pipeline failed)"
        )
    return str(stage.detail.get("run_id", train_run_id(ident)))


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
    if record.spec.sweep is not None:  # its run is the best trial's, once the sweep ended
        run = str(train.get("run_id", ""))
    else:
        run = f"{record.pipeline_id}.train" if record.stages["train"].status != "pending" else ""
    return {
        "pipeline": record.pipeline_id,
        "status": record.status,
        "submitted": record.submitted.strftime("%Y-%m-%d %H:%M:%S"),
        "dataset": dataset,
        "run": run,
        "model": model,
        "endpoint": deploy.get("endpoint", ""),
    }


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


BEST_MARK = "*"
"""After the trial index of the sweep's best trial (of the leading completed one while the
sweep runs), in `status`'s table: one token, so ``awk`` still reads the column."""


def leading(record: SweepRecord) -> Trial | None:
    """The sweep's best trial once it ended; while it runs, the best completed trial so far
    (the one it would deploy if it ended now). None when no trial completed."""
    if record.best_trial is not None:
        return record.best_trial
    return next((t for t in ranked(record) if t.status == "completed"), None)


def objective_header(record: SweepRecord) -> str:
    """The objective's column heading: the metric, and which way is better."""
    objective = record.spec.objective
    return f"{objective.metric} ({objective.direction})"


def sweep_rows(record: SweepRecord) -> list[dict[str, Any]]:
    """A sweep's trials as table rows, best first (:func:`ranked`): index (the best marked
    with :data:`BEST_MARK`), status, each hyperparameter of the space, the objective, the run,
    and why a stopped or failed trial ended."""
    names = list(record.spec.space)
    fixed = ("trial", "status", "run", "reason", objective_header(record))
    top = leading(record)
    rows = []
    for trial in ranked(record):
        mark = BEST_MARK if top is not None and trial.index == top.index else ""
        row: dict[str, Any] = {"trial": f"{trial.index}{mark}", "status": trial.status}
        for name in names:  # a name that is also a column's keeps apart as param.<name>
            column = f"param.{name}" if name in fixed else name
            row[column] = _param_text(trial.params.get(name))
        row[objective_header(record)] = _objective_text(trial.objective)
        row["run"] = trial.run_id
        row["reason"] = trial.reason or ""
        rows.append(row)
    return rows


def sweep_headline(record: SweepRecord) -> str:
    """One line above the table: the sweep's state, its trials by status, the best trial."""
    spec = record.spec
    counts = ", ".join(f"{record.count(s)} {s}" for s in TRIAL_STATUSES if record.count(s))
    top = leading(record)
    said = "best" if record.best_trial is not None else "leading"
    best = (
        f"; {said}: trial {top.index} ({spec.objective.metric} {_objective_text(top.objective)})"
        if top is not None
        else ""
    )
    status: str = record.status
    if record.cancelled is not None:
        status += f" (cancelled: {record.cancelled})"
    return (
        f"sweep {record.sweep_id}: {status}, {spec.algorithm}, "
        f"{len(record.trials)} of {spec.max_trials} trials planned ({counts or 'none yet'}), "
        f"{spec.parallel} at once{best}"
    )


def sweep_report(record: SweepRecord) -> dict[str, Any]:
    """A sweep for `status --json`: how it is set up, its trials by status and best first,
    each with its hyperparameters, objective (null when it has none), run and reason."""
    spec = record.spec
    top = leading(record)
    return {
        "sweep_id": record.sweep_id,
        "status": record.status,
        "cancelled": record.cancelled,
        "algorithm": spec.algorithm,
        "objective": {"metric": spec.objective.metric, "direction": spec.objective.direction},
        "max_trials": spec.max_trials,
        "parallel": spec.parallel,
        "best": record.best,
        "leading": None if top is None else top.index,
        "counts": {status: record.count(status) for status in TRIAL_STATUSES},
        "trials": [
            {
                "index": trial.index,
                "status": trial.status,
                "params": dict(trial.params),
                "objective": _finite(trial.objective),
                "run_id": trial.run_id,
                "reason": trial.reason,
                "model_version": trial.model_version,
                "started": trial.started.isoformat() if trial.started else None,
                "ended": trial.ended.isoformat() if trial.ended else None,
            }
            for trial in ranked(record)
        ],
    }


def _finite(value: float | None) -> float | None:
    """JSON has no NaN: a diverged trial's objective is null there."""
    return None if value is None or math.isnan(value) else value


def _objective_text(value: float | None) -> str:
    if value is None:
        return ""
    return "nan" if math.isnan(value) else f"{value:.4g}"


def _param_text(value: object) -> str:
    if value is None:
        return ""
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class ModelInfo:
    """What a model's v2 metadata tells a client: its input, and what it declares (labels in
    output order, how raw inputs are scaled)."""

    name: str
    input_name: str
    datatype: str
    shape: tuple[int, ...]
    labels: list[str] | None = None
    preprocessing: InputPreprocessing | None = None

    @classmethod
    def from_metadata(cls, metadata: Any) -> ModelInfo:
        """From the JSON of ``GET /v2/models/<name>``; :class:`ValueError` when malformed."""
        try:
            declared = metadata["inputs"][0]
            name, datatype = str(declared["name"]), str(declared["datatype"])
            shape = tuple(int(n) for n in declared["shape"])
            model = str(metadata["name"])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ValueError(f"the model's metadata declares no usable input: {exc!r}") from exc
        labels, preprocessing = read_model_parameters(metadata.get("parameters"))
        return cls(model, name, datatype, shape, labels, preprocessing)


class InputMismatch(ValueError):
    """The input does not fit the model's input signature (the CLI's usage error)."""


def prepare_input(
    sample: np.ndarray[Any, Any], info: ModelInfo, *, batched: bool, raw: bool
) -> np.ndarray[Any, Any]:
    """The batch to send: ``sample`` with a batch dimension unless it has one (``batched``),
    checked against the model's input shape, and scaled as the model declares unless ``raw``
    (the input is then already what the model takes)."""
    batch = sample if batched else sample[None, ...]
    want = info.shape
    if len(batch.shape) != len(want) or any(
        w not in (-1, got) for w, got in zip(want, batch.shape, strict=True)
    ):
        given = (
            f"a batch of shape {list(batch.shape)}"
            if batched
            else (f"one sample of shape {list(sample.shape)}")
        )
        one = [1 if n == -1 else n for n in want[1:]]
        raise InputMismatch(
            f"the input is {given}; model {info.name!r} takes shape {list(want)} (the first "
            f"dimension is the batch): one sample is {one}, a batch (--batched) is "
            f"[n, {', '.join(map(str, one))}]"
        )
    if raw or info.preprocessing is None:
        return batch
    scaled: np.ndarray[Any, Any] = info.preprocessing.apply(batch.astype(np.float64))
    return scaled


async def model_info(endpoint: str) -> ModelInfo:
    """The model's metadata at its endpoint (``GET /v2/models/<name>``)."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http,
        http.get(endpoint) as r,
    ):
        metadata = await r.json(content_type=None)
        if r.status != 200:
            raise RuntimeError(f"{endpoint} answered HTTP {r.status}: {metadata}")
    return ModelInfo.from_metadata(metadata)


async def infer(endpoint: str, info: ModelInfo, batch: np.ndarray[Any, Any]) -> dict[str, Any]:
    """One V2 inference of ``batch`` (with its batch dimension), sent as the model's input."""
    body = {"inputs": [_tensor(info.input_name, info.datatype, batch)]}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http,
        http.post(f"{endpoint}/infer", json=body) as r,
    ):
        answer: dict[str, Any] = await r.json(content_type=None)
        if r.status != 200:
            raise RuntimeError(f"inference failed: HTTP {r.status} {answer}")
    return answer


async def predict(endpoint: str, sample: np.ndarray[Any, Any]) -> dict[str, Any]:
    """One V2 inference of ``sample`` (with its batch dimension, as the model takes it: no
    preprocessing) at a model's endpoint; the input's name and datatype come from the model's
    own metadata."""
    return await infer(endpoint, await model_info(endpoint), sample)


def scaling_line(preprocessing: InputPreprocessing) -> str:
    """What ``predict`` did to the input, in one line."""
    sign = "-" if preprocessing.offset < 0 else "+"
    said = f" ({preprocessing.description})" if preprocessing.description else ""
    return (
        f"input scaled as the model declares: x * {preprocessing.scale:g} {sign} "
        f"{abs(preprocessing.offset):g}{said}"
    )


TOP = 3
ScoreKind = Literal["softmax", "probabilities"]


@dataclass(frozen=True)
class Prediction:
    """One input's answer: the predicted label and the best ``TOP`` (label, score)."""

    label: str
    top: list[tuple[str, float]]


@dataclass(frozen=True)
class Decoded:
    predictions: list[Prediction]
    scores: ScoreKind
    """``softmax``: the outputs looked like logits and the scores are their softmax;
    ``probabilities``: they already were (each row in [0, 1], summing to 1)."""

    def as_json(self) -> dict[str, Any]:
        return {
            "scores": self.scores,
            "predictions": [
                {"label": p.label, "top": [{"label": k, "score": v} for k, v in p.top]}
                for p in self.predictions
            ],
        }

    def lines(self) -> list[str]:
        said = {
            "softmax": "scores: softmax of the model's outputs (they look like logits)",
            "probabilities": "scores: the model's outputs (they are probabilities)",
        }
        rows = [said[self.scores]]
        for n, p in enumerate(self.predictions):
            top = "  ".join(f"{label} {score:.3f}" for label, score in p.top)
            rows.append(f"input {n}: {p.label}    top {len(p.top)}: {top}")
        return rows


def decode(answer: dict[str, Any], labels: Sequence[str], *, top: int = TOP) -> Decoded | None:
    """The labelled answer, or None when the first output is not one score per label and
    input (shape ``[n, len(labels)]``): then there is nothing to name."""
    try:
        output = answer["outputs"][0]
        shape = [int(n) for n in output["shape"]]
        data = output["data"]
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    if len(shape) != 2 or shape[1] != len(labels) or not labels:
        return None
    scores = np.asarray(data, dtype=np.float64).reshape(shape)
    probabilities = bool(
        np.all((scores >= 0) & (scores <= 1)) and np.allclose(scores.sum(axis=1), 1, atol=1e-3)
    )
    if not probabilities:
        shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
        scores = shifted / shifted.sum(axis=1, keepdims=True)
    predictions = []
    for row in scores:
        best = np.argsort(-row, kind="stable")[:top]
        ranked = [(labels[i], float(row[i])) for i in best]
        predictions.append(Prediction(ranked[0][0], ranked))
    return Decoded(predictions, "probabilities" if probabilities else "softmax")


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


_LOG_CONTEXT = frozenset({"event", "level", "timestamp", "run_id", "attempt", "rank"})
"""Keys every rank log line carries: shown as the line's head, or by the file's header."""


def render_log_line(line: str) -> str:
    """A rank log line for people: ``14:02:11.617 info  train.progress step=10 loss=2.156``,
    an exception's traceback on its own lines. Text that is not a JSON log event (a traceback
    the rank printed) is left as it is."""
    try:
        record = json.loads(line)
    except ValueError:
        return line.rstrip("\n")
    if not isinstance(record, dict) or "event" not in record:
        return line.rstrip("\n")
    stamp = str(record.get("timestamp", ""))
    clock = stamp[11:23] if len(stamp) >= 23 else stamp
    exception = record.pop("exception", None)
    fields = " ".join(
        f"{key}={_log_value(value)}" for key, value in record.items() if key not in _LOG_CONTEXT
    )
    head = f"{clock} {record.get('level', ''):5s} {record['event']} {fields}".rstrip()
    if isinstance(exception, str) and exception:
        return head + "\n" + "\n".join(f"    {row}" for row in exception.splitlines())
    return head


def _log_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return value if value and " " not in value else json.dumps(value)
    return json.dumps(value, separators=(",", ":"))


Scalars = dict[str, list[tuple[int, float]]]
"""A history's scalars: tag (``train/loss``, ...) -> ``[(step, value), ...]`` by step."""


class HistoryNotFound(LookupError):
    """A run that is not under the storage root, or that has no history (yet)."""


def history_attempts(storage_root: Path, run_id: str) -> list[Path]:
    """The run's history folders, one per attempt that wrote any, in attempt order.
    :class:`HistoryNotFound` for an unknown run or one without history;
    :class:`~torchrelay.shared.errors.UnsafePath` for a run id that is not one path segment."""
    layout = Layout(storage_root)
    folder = layout.history(run_id)
    if not layout.run(run_id).is_dir():
        raise HistoryNotFound(f"no run {run_id} under {layout.run(run_id).parent}")
    attempts = {
        number: path
        for path in (folder.iterdir() if folder.is_dir() else [])
        if (number := _attempt(path)) is not None and any(path.glob("events.out.tfevents.*"))
    }
    if not attempts:
        raise HistoryNotFound(
            f"run {run_id} has no history (TensorBoard event files) in {folder}: rank 0 writes "
            "it as it reports progress"
        )
    return [attempts[number] for number in sorted(attempts)]


def _attempt(folder: Path) -> int | None:
    """The attempt whose history ``folder`` is (``attempt-<a>``), else None."""
    number = folder.name.rpartition("-")[2]
    if not number.isdigit() or attempt_folder(int(number)) != folder.name:
        return None
    return int(number)


def read_scalars(folder: Path) -> Scalars:
    """Every scalar of the TensorBoard event files in ``folder``, as TensorBoard reads them
    (tensorboard is in the ``train`` extra)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep them all
    events.Reload()
    return {
        tag: [(int(event.step), float(event.value)) for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


def merge_attempts(attempts: Sequence[Scalars]) -> Scalars:
    """One curve per tag from each attempt's scalars (oldest first): a resumed attempt starts
    again at its checkpoint's step, so from its first step of a tag on, its values replace what
    earlier attempts reported there (the work that was redone)."""
    merged: Scalars = {}
    for scalars in attempts:
        for tag, series in scalars.items():
            if not series:
                continue
            resumed_at = min(step for step, _ in series)
            kept = [point for point in merged.get(tag, []) if point[0] < resumed_at]
            merged[tag] = kept + sorted(series, key=lambda point: point[0])
    return merged


def run_history(storage_root: Path | str, run_id: str) -> Scalars:
    """A run's history as rank 0 wrote it (``torchrelay tensorboard`` shows the same):
    ``{tag: [(step, value), ...]}`` with tags ``train/loss``, ``train/samples_per_s``,
    ``train/lr``, ``metrics/<name>`` and ``export/<name>``; a resumed run's attempts as one
    curve (see :func:`merge_attempts`). ``storage_root`` is the platform's
    (:attr:`torchrelay.platform.LocalPlatform.storage_root`), the run id a pipeline's
    (:func:`train_run_id`). Raises :class:`HistoryNotFound` or
    :class:`~torchrelay.shared.errors.UnsafePath` (see :func:`history_attempts`).

    ::

        losses = run_history(local.storage_root, train_run_id(pipeline_id))["train/loss"]
    """
    folders = history_attempts(Path(storage_root), run_id)
    return merge_attempts([read_scalars(folder) for folder in folders])
