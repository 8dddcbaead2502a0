"""Glue: training requests -> backend launches -> run records and train.* events."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.machinery
import importlib.util
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import structlog
from prometheus_client import Counter
from pydantic import JsonValue

from torchrelay.services.train.domain import (
    ModelRecord,
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
from torchrelay.services.train.workspaces import workspace_refusal
from torchrelay.shared.bus.port import Publish
from torchrelay.shared.cluster import Ended, Status, TrainingBackend, Unplaceable, WorkerJob
from torchrelay.shared.cluster.worker_spec import COLLECTIVE_TIMEOUT_S, RENDEZVOUS_TIMEOUT_S
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
from torchrelay.shared.pipelines import (
    PipelineRecord,
    pipeline_key,
    record_stage,
    train_run_id,
)
from torchrelay.shared.runs import (
    Outcome,
    RunRecord,
    RunStatus,
    halted_event_id,
    outcome_event_id,
)
from torchrelay.shared.runtime.loops import every
from torchrelay.shared.state import State, Store, key_part
from torchrelay.shared.state.presence import Presence
from torchrelay.shared.storage.failures import RankFailure
from torchrelay.shared.storage.files import CorruptFile, MissingFile, RunResult
from torchrelay.shared.storage.layout import Layout, relative_dataset

log = structlog.get_logger("torchrelay.train")
SCHEDULE_RETRIES_S = (1.0, 2.0, 4.0)
SETTLE_TRIES = 6
"""Tries to record how an attempt ended (about a minute) before it is failed instead."""
ANNOUNCE_GRACE_S = 60.0
"""An outcome this replica recorded but has not announced this long after (no watch of its
own is announcing it) is announced by reclaim: the handler that recorded it died half-way."""


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
        reconciled: Counter,
        retain_s: float | None = None,
        reclaim_every_s: float = 2.0,
        rendezvous_timeout_s: float = RENDEZVOUS_TIMEOUT_S,
        collective_timeout_s: float = COLLECTIVE_TIMEOUT_S,
    ) -> None:
        self.backend = backend
        self.reconciled = reconciled
        self.runs: Store[RunRecord] = state.store("runs", RunRecord)
        self.models: Store[ModelRecord] = state.store("models", ModelRecord)
        self.pipelines: Store[PipelineRecord] = state.store("pipelines", PipelineRecord)
        self._publish = publish
        self._root = storage_root
        self._layout = Layout(storage_root)
        self._nats_url = nats_url
        self._rendezvous_timeout_s = rendezvous_timeout_s
        self._collective_timeout_s = collective_timeout_s
        self._presence = presence
        self._instance = presence.instance
        self._reclaim_every_s = reclaim_every_s
        self._source = source
        self._entrypoints = tuple(entrypoints)
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._launching: set[str] = set()
        """Runs this process is recording and launching: running, and not followed yet."""
        self._retain_s = retain_s
        """How long a finished run's record is kept (None: for good)."""
        self.halted: Callable[[RunRecord], Awaitable[str | None]] | None = None
        """Why a sweep trial's run must not be restarted (its trial was stopped early, or its
        sweep cancelled, while it awaited the restart), or None: set by the sweeps."""
        self._unsettled = self.runs.live(lambda run: run.status == "running" or not run.announced)
        """Runs that are running or whose outcome is not announced yet, followed by a KV
        watch: what reclaim looks at."""

    # --- handlers ---------------------------------------------------------------------------

    async def on_requested(self, event: TrainRequested) -> None:
        run_id = run_id_for(event.data.run_id, event.id)
        await self.start(run_id, event.data.spec, event.pipelineid, event.id)

    async def on_dataset_staged(self, event: DatasetStaged) -> None:
        """A pipeline's dataset is ready: train on it as the pipeline's spec says (a sweep's
        pipeline is left to the sweeps: :class:`~torchrelay.services.train.sweeps.Sweeps`)."""
        if event.pipelineid is None:
            return
        pipeline = await self.pipelines.get(pipeline_key(event.pipelineid))
        if pipeline is None:
            return
        await self.train_pipeline(event, pipeline.value)

    async def train_pipeline(self, event: DatasetStaged, pipeline: PipelineRecord) -> None:
        spec = pipeline_job(pipeline, event.data.name, event.data.version)
        await self.start(train_run_id(pipeline.pipeline_id), spec, pipeline.pipeline_id, event.id)

    async def start(
        self,
        run_id: str,
        spec: TrainJobSpec,
        pipeline_id: str | None,
        cause: str,
        *,
        trial: int | None = None,
    ) -> None:
        """Check, record and launch a run (a run id that exists is left alone). A sweep's
        ``trial`` leaves the pipeline's train stage to its sweep."""
        if await self.runs.get(key_part(run_id)) is not None:
            return  # a redelivery: the run exists and is being (or was) handled
        with self._launching_run(run_id):
            await self._start(run_id, spec, pipeline_id, cause, trial)

    async def _start(
        self,
        run_id: str,
        spec: TrainJobSpec,
        pipeline_id: str | None,
        cause: str,
        trial: int | None,
    ) -> None:
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
            trial=trial,
            reason=problem,
            updated=datetime.now(UTC),
        )
        try:
            await self.runs.create(key_part(run_id), record)
        except AlreadyExists:
            return
        if pipeline_id is not None and trial is None:
            detail: dict[str, JsonValue] = {"run_id": run_id}
            if spec.workspace is not None:  # lineage: the code it ran
                detail["workspace"] = spec.workspace
            await record_stage(
                self.pipelines, pipeline_id, "train", "running", datetime.now(UTC),
                detail=detail,
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
        if self.halted is not None and current.value.trial is not None:
            halted = await self.halted(current.value)
            if halted is not None:
                await self.end_halted(current.value, halted)
                return
        record = current.value.model_copy(
            update={
                "status": "running",
                "attempt": event.data.attempt,
                "owner": self._instance,
                "handle": None,  # the last attempt's; the new one's is stored once launched
                "cancel": None,
                "outcome": None,
                "announced": True,
                "reason": event.data.reason,
                "updated": datetime.now(UTC),
            }
        )
        with self._launching_run(record.run_id):
            await self.runs.update(key_part(record.run_id), record, revision=current.revision)
            await self._launch(record, cause=event.id)

    async def end_halted(self, run: RunRecord, reason: str) -> RunRecord | None:
        """Make the failure a restart was due after final (compare-and-set on the run: a
        restart that read it before fails its update, and its redelivery finds the run over),
        and say so with a final ``train.failed``. The run as stored after; None if gone."""

        def final(current: RunRecord | None) -> RunRecord | None:
            if current is None or current.attempt != run.attempt or not current.restart_due:
                return None
            if not isinstance(current.outcome, TrainFailedData):  # restart_due says it is
                return None
            outcome = current.outcome.model_copy(update={"final": True, "reason": reason[:512]})
            return current.model_copy(
                update={"outcome": outcome, "reason": reason, "updated": datetime.now(UTC)}
            )

        await self.runs.mutate(key_part(run.run_id), final, ttl_s=self._retain_s)
        stored = await self.runs.get(key_part(run.run_id))
        if stored is None:
            return None
        halted = stored.value
        failure = halted.outcome
        said = halted.attempt == run.attempt and halted.reason == reason
        if said and isinstance(failure, TrainFailedData) and failure.final:
            await self._publish(
                TrainFailed(
                    id=halted_event_id(halted.run_id, halted.attempt),
                    **self._envelope(halted, None),
                    data=failure,
                )
            )
            log.info("restart.halted", run_id=run.run_id, attempt=run.attempt, reason=reason)
        return halted

    @contextlib.contextmanager
    def _launching_run(self, run_id: str) -> Iterator[None]:
        self._launching.add(run_id)
        try:
            yield
        finally:
            self._launching.discard(run_id)

    async def on_cancel_requested(self, event: TrainCancelRequested) -> None:
        run_id = event.data.run_id
        current = await self.runs.get(key_part(run_id))
        if current is None:
            log.info("cancel.unknown_run", run_id=run_id)
            return
        run = current.value
        if run.status != "running":
            await self._answer_ended(run, event.id)
            return
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

    async def _answer_ended(self, run: RunRecord, cause: str) -> None:
        """A cancel for an attempt that already ended is answered with how it ended: its
        outcome is announced again, under the same event id (the stream keeps one copy while
        the first is in its duplicate window; a canceller that missed it gets it later). An
        announced success is not repeated: nothing in a cancel can change it."""
        log.info("cancel.already_ended", run_id=run.run_id, attempt=run.attempt, status=run.status)
        if run.outcome is None:  # written before outcomes were kept: nothing to say again
            return
        if run.announced and run.status == "succeeded":
            return
        await self._announce(run, cause)

    # --- runs whose replica died ------------------------------------------------------------

    async def reclaim(self, stop: asyncio.Event) -> None:
        """Background loop: a running run whose owner replica is gone (its workers died with
        it) ends as a failed attempt, so the monitor restarts it from its last checkpoint; an
        outcome recorded by a replica that died before announcing it is announced."""
        async with self._unsettled:
            await every(self._reclaim_every_s, stop, self.reclaim_orphans, name="train.reclaim")

    async def reclaim_orphans(self) -> list[str]:
        """One round of :meth:`reclaim` (over the live view: no KV request for a run that is
        settled); returns the runs this replica took over."""
        taken = []
        now = datetime.now(UTC)
        for item in self._unsettled.items():
            run = item.value
            if run.owner == self._instance:
                if self._unannounced_here(run, now):
                    await self._announce(run, None)
                    self.reconciled.labels("unannounced").inc()
                if not self._lost_here(run):
                    continue
            elif await self._presence.alive(run.owner):
                continue
            try:  # compare-and-set: of all replicas that noticed, one takes the run over
                claimed = run.model_copy(update={"owner": self._instance})
                await self.runs.update(item.key, claimed, revision=item.revision)
            except StaleRevision:
                continue
            taken.append(run.run_id)
            if run.status != "running":  # ended, and its replica died before saying so
                log.warning("run.announcing", run_id=run.run_id, attempt=run.attempt)
                await self._announce(claimed, None)
                self.reconciled.labels("unannounced").inc()
                continue
            self.reconciled.labels("orphaned").inc()
            handle = await self.backend.adopt(self.backend.dryrun(self._attempt_of(run)))
            if handle is not None:  # the attempt outlived its replica (a Kubernetes Job)
                log.info("run.adopted", run_id=run.run_id, attempt=run.attempt, owner=run.owner)
                self._follow(await self._store_handle(claimed, handle), handle, None)
                continue
            log.warning("run.orphaned", run_id=run.run_id, attempt=run.attempt, owner=run.owner)
            reason = f"the train replica {run.owner} that ran attempt {run.attempt} is gone"
            await self._failed(
                claimed, Ended(Status.FAILED, reason), final=orphan_is_final(run), cause=None
            )
        return taken

    def _lost_here(self, run: RunRecord) -> bool:
        """A running attempt recorded under this replica's name that this process neither
        follows nor is launching: an earlier process of the same name ran it (a container
        restarted in its pod keeps the pod's name), so it is taken over like any orphan."""
        return (
            run.status == "running"
            and run.run_id not in self._watchers
            and run.run_id not in self._launching
        )

    def _unannounced_here(self, run: RunRecord, now: datetime) -> bool:
        """An outcome this replica recorded and left unannounced: the handler that recorded it
        stopped half-way (its event is redelivered, but finds the run settled), and no watch
        of this replica is announcing it."""
        return (
            not run.announced
            and run.run_id not in self._watchers
            and (now - run.updated).total_seconds() > ANNOUNCE_GRACE_S
        )

    # --- launching and watching ------------------------------------------------------------

    def _check(self, spec: TrainJobSpec) -> tuple[str | None, str]:
        dataset_path = relative_dataset(spec.dataset.name, spec.dataset.version)
        if not self._layout.manifest(spec.dataset.name, spec.dataset.version).is_file():
            return (
                f"unknown dataset {spec.dataset.name} version {spec.dataset.version}: "
                "stage it first (dataset.ingest.requested)",
                dataset_path,
            )
        if spec.workspace is not None:  # the user's own code: checked where ranks import it
            return workspace_refusal(self._layout, spec.workspace, spec.entrypoint), dataset_path
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
            rendezvous_timeout_s=self._rendezvous_timeout_s,
            collective_timeout_s=self._collective_timeout_s,
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
        failures = await asyncio.to_thread(self._rank_failures, record)
        end = attempt_end(record, ended, intent, failures)
        await self._failed(record, end.ended, final=end.final, cause=cause, error=end.error)

    def _rank_failures(self, record: RunRecord) -> list[RankFailure]:
        """What the attempt's ranks wrote about their code's failure (none for a rank that
        was killed or failed outside its code). A file unreadable as the contract is left out:
        the attempt then fails as a crash would, with the backend's reason."""
        failures = []
        for rank in range(record.spec.world_size):
            path = self._layout.rank_error(record.run_id, record.attempt, rank)
            try:
                failures.append(RankFailure.read(path))
            except MissingFile:
                continue
            except (CorruptFile, OSError) as exc:
                log.warning("run.failure_unreadable", run_id=record.run_id, error=str(exc))
        return failures

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
        outcome = TrainCompletedData(
            run_id=record.run_id,
            model_name=result.model_name,
            model_version=result.version,
            path=result.path,
            metrics=result.metrics,
        )
        recorded = await self._record_outcome(record, "succeeded", outcome, reason=None)
        await self._announce(recorded, cause)
        log.info("run.completed", run_id=record.run_id, metrics=result.metrics)

    async def _failed(
        self,
        record: RunRecord,
        ended: Ended,
        *,
        final: bool,
        cause: str | None,
        error: RankFailure | None = None,
    ) -> None:
        status: RunStatus = "cancelled" if ended.status is Status.CANCELLED else "failed"
        outcome = TrainFailedData(
            run_id=record.run_id,
            attempt=record.attempt,
            reason=ended.reason[:512],
            rank=ended.rank,
            exit_code=ended.exit_code,
            signal=ended.signal,
            log_tail=ended.log_tail[-50:],
            final=final,
            error_type=error.error_type if error else None,
            error_message=error.message if error else None,
        )
        recorded = await self._record_outcome(record, status, outcome, reason=ended.reason)
        await self._announce(recorded, cause)
        log.warning(
            "run.failed",
            run_id=record.run_id,
            reason=ended.reason,
            final=final,
            error_type=error.error_type if error else None,
        )

    async def _record_outcome(
        self, record: RunRecord, status: RunStatus, outcome: Outcome, *, reason: str | None
    ) -> RunRecord:
        """Write how the attempt ended, not yet announced: from here on, whichever replica
        holds the run can announce it (:meth:`_announce`), this one or the one that takes
        the run over if this one dies."""

        def change(current: RunRecord | None) -> RunRecord:
            base = current or record
            return base.model_copy(
                update={
                    "status": status,
                    "reason": reason,
                    "model_version": (
                        outcome.model_version if isinstance(outcome, TrainCompletedData) else None
                    ),
                    "outcome": outcome,
                    "announced": False,
                    "updated": datetime.now(UTC),
                }
            )

        stored = await self.runs.mutate(key_part(record.run_id), change, ttl_s=self._retain_s)
        return stored.value if stored is not None else change(None)

    async def _announce(self, record: RunRecord, cause: str | None) -> None:
        """Write the pipeline's train stage, publish the event of the run's recorded outcome,
        then mark the outcome announced. The stage comes first so that whoever acts on the
        event reads the stage it reports. Idempotent: the event's id comes from the run and
        attempt, and a finished stage is never written twice."""
        outcome = record.outcome
        if outcome is None:
            return
        if record.pipeline_id is not None and record.trial is None:
            await self._record_train_stage(record.pipeline_id, outcome)
        envelope: dict[str, str | None] = {
            "id": outcome_event_id(record.run_id, record.attempt, outcome),
            **self._envelope(record, cause),
        }
        if isinstance(outcome, TrainCompletedData):
            await self._publish(TrainCompleted(**envelope, data=outcome))
        else:
            await self._publish(TrainFailed(**envelope, data=outcome))

        def announced(current: RunRecord | None) -> RunRecord | None:
            if current is None or current.attempt != record.attempt or current.announced:
                return None
            return current.model_copy(update={"announced": True})

        await self.runs.mutate(key_part(record.run_id), announced, ttl_s=self._retain_s)

    async def _record_train_stage(self, pipeline_id: str, outcome: Outcome) -> None:
        now = datetime.now(UTC)
        if isinstance(outcome, TrainCompletedData):
            detail: dict[str, JsonValue] = {
                "model": outcome.model_name,
                "version": outcome.model_version,
                "metrics": dict(outcome.metrics),
            }
            await record_stage(
                self.pipelines, pipeline_id, "train", "succeeded", now,
                detail=detail,
                retain_s=self._retain_s,
            )  # fmt: skip
        elif outcome.final:
            await record_stage(
                self.pipelines, pipeline_id, "train", "failed", now,
                reason=outcome.reason,
                retain_s=self._retain_s,
            )  # fmt: skip

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


def pipeline_job(pipeline: PipelineRecord, dataset: str, version: str) -> TrainJobSpec:
    """The pipeline's training stage on the staged dataset ``dataset@version``."""
    return TrainJobSpec(
        dataset=DatasetRef(name=dataset, version=version),
        **pipeline.spec.training.model_dump(),
    )


def _source_of(found: importlib.machinery.ModuleSpec) -> str | None:
    """The module's Python source, read (never run); None for a builtin, frozen, C or
    bytecode-only module, or one whose file cannot be read."""
    if found.origin is None or not found.has_location or not found.origin.endswith(".py"):
        return None
    try:
        return importlib.util.decode_source(Path(found.origin).read_bytes())
    except (OSError, SyntaxError, ValueError):  # a bad coding cookie, undecodable bytes
        return None
