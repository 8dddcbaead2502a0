"""Glue: training requests -> backend launches -> run records and train.* events."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.machinery
import importlib.util
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import structlog
from pydantic import JsonValue

from torchrelay.services.train.domain import (
    ModelRecord,
    RunRecord,
    attempt_end,
    entrypoint_module_refusal,
    entrypoint_refusal,
    model_key,
    orphan_is_final,
    restart_allowed,
    result_refusal,
    run_id_for,
    run_id_refusal,
    settle_pause_s,
)
from torchrelay.shared.bus.port import Publish
from torchrelay.shared.cluster import Ended, Status, TrainingBackend, Unplaceable, WorkerJob
from torchrelay.shared.errors import (
    AlreadyExists,
    NotOwned,
    PermanentError,
    StaleRevision,
    TorchrelayError,
    TransientError,
)
from torchrelay.shared.events import (
    DatasetStaged,
    TrainCancelRequested,
    TrainCompleted,
    TrainFailed,
    TrainRequested,
    TrainRestartRequested,
    TrainStarted,
)
from torchrelay.shared.events.data import (
    DatasetRef,
    TrainCompletedData,
    TrainFailedData,
    TrainJobSpec,
    TrainStartedData,
)
from torchrelay.shared.pipelines import PipelineRecord, pipeline_key, record_stage
from torchrelay.shared.runtime.loops import every
from torchrelay.shared.state import State, Store, key_part
from torchrelay.shared.state.presence import Presence
from torchrelay.shared.storage.files import CorruptFile, MissingFile, RunResult
from torchrelay.shared.storage.layout import Layout, relative_dataset

log = structlog.get_logger("torchrelay.train")
SCHEDULE_RETRIES_S = (1.0, 2.0, 4.0)
SETTLE_TRIES = 6
"""Tries to record how an attempt ended (about a minute) before it is failed instead."""


class Trainer:
    def __init__(
        self,
        *,
        backend: TrainingBackend,
        state: State,
        publish: Publish,
        storage_root: Path,
        nats_url: str,
        presence: Presence,
        source: str,
        entrypoints: Sequence[str],
        retain_s: float | None = None,
        reclaim_every_s: float = 2.0,
    ) -> None:
        self.backend = backend
        self.runs: Store[RunRecord] = state.store("runs", RunRecord)
        self.models: Store[ModelRecord] = state.store("models", ModelRecord)
        self.pipelines: Store[PipelineRecord] = state.store("pipelines", PipelineRecord)
        self._publish = publish
        self._root = storage_root
        self._layout = Layout(storage_root)
        self._nats_url = nats_url
        self._presence = presence
        self._instance = presence.instance
        self._reclaim_every_s = reclaim_every_s
        self._source = source
        self._entrypoints = tuple(entrypoints)
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._retain_s = retain_s
        """How long a finished run's record is kept (None: for good)."""
        self._running = self.runs.live(lambda run: run.status == "running")
        """The running runs, followed by a KV watch: what reclaim looks at."""

    # --- handlers ---------------------------------------------------------------------------

    async def on_requested(self, event: TrainRequested) -> None:
        run_id = run_id_for(event.data.run_id, event.id)
        await self.start(run_id, event.data.spec, event.pipelineid, event.id)

    async def on_dataset_staged(self, event: DatasetStaged) -> None:
        """A pipeline's dataset is ready: train on it as the pipeline's spec says."""
        if event.pipelineid is None:
            return
        pipeline = await self.pipelines.get(pipeline_key(event.pipelineid))
        if pipeline is None:
            return
        training = pipeline.value.spec.training
        spec = TrainJobSpec(
            dataset=DatasetRef(name=event.data.name, version=event.data.version),
            **training.model_dump(),
        )
        await self.start(f"{event.pipelineid}.train", spec, event.pipelineid, event.id)

    async def start(
        self, run_id: str, spec: TrainJobSpec, pipeline_id: str | None, cause: str
    ) -> None:
        """Check, record and launch a run (a run id that exists is left alone)."""
        if await self.runs.get(key_part(run_id)) is not None:
            return  # a redelivery: the run exists and is being (or was) handled
        problem, dataset_path = self._check(spec)
        problem = run_id_refusal(run_id) or problem
        if problem is None:
            try:
                self.backend.check(self._worker_job(run_id, 0, spec, dataset_path, pipeline_id))
            except Unplaceable as exc:
                problem = str(exc)
        record = RunRecord(
            run_id=run_id,
            spec=spec,
            dataset_path=dataset_path,
            status="failed" if problem else "running",
            attempt=0,
            owner=self._instance,
            pipeline_id=pipeline_id,
            reason=problem,
            updated=datetime.now(UTC),
        )
        try:
            await self.runs.create(key_part(run_id), record)
        except AlreadyExists:
            return
        if pipeline_id is not None:
            await record_stage(
                self.pipelines, pipeline_id, "train", "running", datetime.now(UTC),
                detail={"run_id": run_id},
                retain_s=self._retain_s,
            )  # fmt: skip
        if problem is not None:
            await self._failed(record, Ended(Status.FAILED, problem), final=True, cause=cause)
            return
        await self._launch(record, cause=cause)

    async def on_restart_requested(self, event: TrainRestartRequested) -> None:
        current = await self.runs.get(key_part(event.data.run_id))
        if current is None:
            log.warning("restart.unknown_run", run_id=event.data.run_id)
            return
        refusal = restart_allowed(current.value, event.data.attempt)
        if refusal is not None:
            log.info("restart.ignored", run_id=event.data.run_id, reason=refusal)
            return
        record = current.value.model_copy(
            update={
                "status": "running",
                "attempt": event.data.attempt,
                "owner": self._instance,
                "handle": None,  # the last attempt's; the new one's is stored once launched
                "cancel": None,
                "reason": event.data.reason,
                "updated": datetime.now(UTC),
            }
        )
        await self.runs.update(key_part(record.run_id), record, revision=current.revision)
        await self._launch(record, cause=event.id)

    async def on_cancel_requested(self, event: TrainCancelRequested) -> None:
        run_id = event.data.run_id
        current = await self.runs.get(key_part(run_id))
        if current is None or current.value.status != "running":
            return
        run = current.value
        if run.handle is None:
            raise TransientError(
                f"run {run_id} attempt {run.attempt} has no stored handle yet (it is being "
                "launched); the cancel is retried",
                delay_s=1.0,
            )
        intent: Literal["final", "restart"] = "restart" if event.data.restart else "final"

        def mark(latest: RunRecord | None) -> RunRecord | None:
            if latest is None or latest.attempt != run.attempt or latest.cancel == intent:
                return None
            return latest.model_copy(update={"cancel": intent})

        # Before the attempt can end: whichever replica watches it reads why it ended.
        await self.runs.mutate(key_part(run_id), mark)
        try:
            await self.backend.cancel(run.handle)
        except NotOwned as exc:  # bound to the replica that started it: redeliver to the owner
            raise TransientError(
                f"run {run_id} is owned by {run.owner}, which alone can cancel it: {exc}",
                delay_s=1.0,
            ) from exc

    # --- runs whose replica died ------------------------------------------------------------

    async def reclaim(self, stop: asyncio.Event) -> None:
        """Background loop: a running run whose owner replica is gone (its workers died with
        it) ends as a failed attempt, so the monitor restarts it from its last checkpoint."""
        async with self._running:
            await every(self._reclaim_every_s, stop, self.reclaim_orphans, name="train.reclaim")

    async def reclaim_orphans(self) -> list[str]:
        """One round of :meth:`reclaim` (over the live view: no KV request for a run that is
        not running); returns the runs this replica took over."""
        taken = []
        for item in self._running.items():
            run = item.value
            if run.status != "running" or run.owner == self._instance:
                continue
            if await self._presence.alive(run.owner):
                continue
            reason = f"the train replica {run.owner} that ran attempt {run.attempt} is gone"
            try:  # compare-and-set: of all replicas that noticed, one takes the run over
                claimed = run.model_copy(update={"owner": self._instance})
                await self.runs.update(item.key, claimed, revision=item.revision)
            except StaleRevision:
                continue
            handle = await self.backend.adopt(self.backend.dryrun(self._attempt_of(run)))
            if handle is not None:  # the attempt outlived its replica (a Kubernetes Job)
                log.info("run.adopted", run_id=run.run_id, attempt=run.attempt, owner=run.owner)
                self._follow(await self._store_handle(claimed, handle), handle, None)
                taken.append(run.run_id)
                continue
            log.warning("run.orphaned", run_id=run.run_id, attempt=run.attempt, owner=run.owner)
            await self._failed(
                run, Ended(Status.FAILED, reason), final=orphan_is_final(run), cause=None
            )
            taken.append(run.run_id)
        return taken

    # --- launching and watching ------------------------------------------------------------

    def _check(self, spec: TrainJobSpec) -> tuple[str | None, str]:
        dataset_path = relative_dataset(spec.dataset.name, spec.dataset.version)
        if not self._layout.manifest(spec.dataset.name, spec.dataset.version).is_file():
            return (
                f"unknown dataset {spec.dataset.name} version {spec.dataset.version}: "
                "stage it first (dataset.ingest.requested)",
                dataset_path,
            )
        # Before any lookup: finding a module imports its parent packages.
        refusal = entrypoint_module_refusal(spec.entrypoint, self._entrypoints)
        if refusal is not None:
            return refusal, dataset_path
        module = spec.entrypoint.partition(":")[0]
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if found is None:
            return f"entrypoint module {module!r} is not importable by the workers", dataset_path
        source = _source_of(found)
        return entrypoint_refusal(spec.entrypoint, self._entrypoints, source), dataset_path

    def _worker_job(
        self,
        run_id: str,
        attempt: int,
        spec: TrainJobSpec,
        dataset_path: str,
        pipeline_id: str | None,
    ) -> WorkerJob:
        return WorkerJob(
            run_id=run_id,
            attempt=attempt,
            job=spec,
            dataset_path=dataset_path,
            storage_root=str(self._root),
            nats_url=self._nats_url,
            pipeline_id=pipeline_id,
        )

    def _attempt_of(self, record: RunRecord) -> WorkerJob:
        return self._worker_job(
            record.run_id, record.attempt, record.spec, record.dataset_path, record.pipeline_id
        )

    def _follow(self, record: RunRecord, handle: str, cause: str | None) -> None:
        """Watch the attempt in the background until it ends."""
        self._watchers[record.run_id] = asyncio.create_task(
            self._watch(record, handle, cause), name=f"watch:{record.run_id}"
        )

    async def _launch(self, record: RunRecord, *, cause: str) -> None:
        try:
            handle = await self._schedule(self._attempt_of(record))
        except TorchrelayError as exc:  # refused (RBAC, an invalid object) or unreachable
            await self._failed(
                record, Ended(Status.FAILED, f"cannot launch: {exc}"), final=True, cause=cause
            )
            return
        record = await self._store_handle(record, handle)
        await self._publish(
            TrainStarted(
                **self._envelope(record, cause),
                data=TrainStartedData(
                    run_id=record.run_id,
                    attempt=record.attempt,
                    world_size=record.spec.world_size,
                    max_restarts=record.spec.max_restarts,
                    backend=self.backend.name,
                    dataset=record.spec.dataset,
                ),
            )
        )
        self._follow(record, handle, cause)

    async def _store_handle(self, record: RunRecord, handle: str) -> RunRecord:
        """Record the attempt's handle, so any replica can cancel it later."""

        def change(current: RunRecord | None) -> RunRecord | None:
            base = current or record
            if base.attempt != record.attempt:  # a later attempt's record: not ours to touch
                return None
            return base.model_copy(update={"handle": handle})

        await self.runs.mutate(key_part(record.run_id), change)
        return record.model_copy(update={"handle": handle})

    async def _schedule(self, job: WorkerJob) -> str:
        """Launch, retrying a backend that is briefly unreachable (its API restarting)."""
        for pause in SCHEDULE_RETRIES_S:
            try:
                return await self.backend.schedule(self.backend.dryrun(job))
            except TransientError as exc:
                log.warning("launch.retrying", run_id=job.run_id, error=str(exc), in_s=pause)
                await asyncio.sleep(pause)
        return await self.backend.schedule(self.backend.dryrun(job))

    async def _watch(self, record: RunRecord, handle: str, cause: str | None) -> None:
        """Follow the attempt until it ends, then record how: supervised, so an error here
        fails the attempt with the reason (the run is never left "running" with a live owner
        that watches nothing)."""
        try:
            ended = await self._ending(handle, record)
            await self._retrying(record, lambda: self._settle(record, ended, cause))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("run.watch_failed", run_id=record.run_id, attempt=record.attempt)
            with contextlib.suppress(Exception):  # no copy of it may keep running
                await self.backend.cancel(handle)
            failed = Ended(
                Status.FAILED,
                f"the train service failed following attempt {record.attempt}: {exc!r}",
            )
            try:
                await self._retrying(
                    record,
                    lambda: self._failed(
                        record, failed, final=orphan_is_final(record), cause=cause
                    ),
                    forever=True,
                )
            except PermanentError:  # the run's record itself is unreadable: say so, loudly
                log.exception("run.unsettled", run_id=record.run_id, attempt=record.attempt)
        finally:
            self._watchers.pop(record.run_id, None)

    async def _ending(self, handle: str, record: RunRecord) -> Ended:
        try:
            return await self.backend.wait(handle)
        except TorchrelayError as exc:  # the backend lost track of it (RBAC, API gone)
            log.exception("run.lost", run_id=record.run_id, attempt=record.attempt)
            with contextlib.suppress(TorchrelayError):  # no second copy may keep running
                await self.backend.cancel(handle)
            return Ended(Status.FAILED, f"lost track of attempt {record.attempt}: {exc}")

    async def _settle(self, record: RunRecord, ended: Ended, cause: str | None) -> None:
        if ended.status is Status.SUCCEEDED:
            refusal: str | None
            try:
                result = await asyncio.to_thread(RunResult.read, self._layout.result(record.run_id))
            except MissingFile as exc:  # shared storage may show it late: try again
                raise TransientError(str(exc)) from exc
            except CorruptFile as exc:
                refusal = f"its result.json is unusable: {exc}"
            else:
                refusal = result_refusal(result)
                if refusal is None:
                    await self._completed(record, result, cause)
                    return
            reason = f"attempt {record.attempt} finished but {refusal}"
            await self._failed(record, Ended(Status.FAILED, reason), final=True, cause=cause)
            return
        latest = await self.runs.get(key_part(record.run_id))
        intent = (
            latest.value.cancel
            if latest is not None and latest.value.attempt == record.attempt
            else None
        )
        ended, final = attempt_end(record, ended, intent)
        await self._failed(record, ended, final=final, cause=cause)

    async def _retrying(
        self,
        record: RunRecord,
        step: Callable[[], Awaitable[None]],
        *,
        forever: bool = False,
    ) -> None:
        """Run ``step`` (idempotent: it records an outcome), again after a pause while the
        state or the bus fails, up to SETTLE_TRIES times (``forever``: until it succeeds or
        the service stops)."""
        tries = 0
        while True:
            tries += 1
            try:
                await step()
            except PermanentError:
                raise  # trying again cannot help
            except Exception as exc:
                if not forever and tries >= SETTLE_TRIES:
                    raise
                pause = settle_pause_s(tries)
                log.warning(
                    "run.settle_retrying",
                    run_id=record.run_id,
                    attempt=record.attempt,
                    error=repr(exc),
                    in_s=pause,
                )
                await asyncio.sleep(pause)
            else:
                return

    async def _completed(self, record: RunRecord, result: RunResult, cause: str | None) -> None:
        dataset = record.spec.dataset
        model = ModelRecord(
            name=result.model_name,
            version=result.version,
            path=result.path,
            metrics=result.metrics,
            run_id=record.run_id,
            dataset=f"{dataset.name}@{dataset.version}",
            pipeline_id=record.pipeline_id,
            created=datetime.now(UTC),
        )
        await self.models.put(model_key(model.name, model.version), model)
        await self._set(record, "succeeded", reason=None, model_version=result.version)
        await self._publish(
            TrainCompleted(
                **self._envelope(record, cause),
                data=TrainCompletedData(
                    run_id=record.run_id,
                    model_name=result.model_name,
                    model_version=result.version,
                    path=result.path,
                    metrics=result.metrics,
                ),
            )
        )
        log.info("run.completed", run_id=record.run_id, metrics=result.metrics)
        if record.pipeline_id is not None:
            detail: dict[str, JsonValue] = {
                "model": result.model_name,
                "version": result.version,
                "metrics": dict(result.metrics),
            }
            await record_stage(
                self.pipelines, record.pipeline_id, "train", "succeeded", datetime.now(UTC),
                detail=detail,
                retain_s=self._retain_s,
            )  # fmt: skip

    async def _failed(
        self, record: RunRecord, ended: Ended, *, final: bool, cause: str | None
    ) -> None:
        status = "cancelled" if ended.status is Status.CANCELLED else "failed"
        await self._set(record, status, reason=ended.reason)
        await self._publish(
            TrainFailed(
                **self._envelope(record, cause),
                data=TrainFailedData(
                    run_id=record.run_id,
                    attempt=record.attempt,
                    reason=ended.reason[:512],
                    rank=ended.rank,
                    exit_code=ended.exit_code,
                    signal=ended.signal,
                    log_tail=ended.log_tail[-50:],
                    final=final,
                ),
            )
        )
        log.warning("run.failed", run_id=record.run_id, reason=ended.reason, final=final)
        if final and record.pipeline_id is not None:
            await record_stage(
                self.pipelines, record.pipeline_id, "train", "failed", datetime.now(UTC),
                reason=ended.reason[:512],
                retain_s=self._retain_s,
            )  # fmt: skip

    async def _set(
        self,
        record: RunRecord,
        status: str,
        *,
        reason: str | None,
        model_version: str | None = None,
    ) -> None:
        def change(current: RunRecord | None) -> RunRecord:
            base = current or record
            return base.model_copy(
                update={
                    "status": status,
                    "reason": reason,
                    "model_version": model_version,
                    "updated": datetime.now(UTC),
                }
            )

        await self.runs.mutate(key_part(record.run_id), change, ttl_s=self._retain_s)

    def _envelope(self, record: RunRecord, cause: str | None) -> dict[str, str | None]:
        return {
            "source": self._source,
            "subject": record.run_id,
            "pipelineid": record.pipeline_id,
            "causationid": cause,
        }

    async def aclose(self) -> None:
        """Stop watching and tear every local job down (the workers die with us)."""
        for task in list(self._watchers.values()):
            task.cancel()
        await asyncio.gather(*self._watchers.values(), return_exceptions=True)
        await self.backend.aclose()


def _source_of(found: importlib.machinery.ModuleSpec) -> str | None:
    """The module's Python source, read (never run); None for a builtin, frozen, C or
    bytecode-only module, or one whose file cannot be read."""
    if found.origin is None or not found.has_location or not found.origin.endswith(".py"):
        return None
    try:
        return importlib.util.decode_source(Path(found.origin).read_bytes())
    except (OSError, SyntaxError, ValueError):  # a bad coding cookie, undecodable bytes
        return None
