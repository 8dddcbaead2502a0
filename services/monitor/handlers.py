"""Glue: every event -> metrics; failed and stalled runs -> restarts from their checkpoints."""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from datetime import UTC, datetime

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from torchrelay.services.monitor.domain import (
    PIPELINE_ENDINGS,
    Recovery,
    RunWatch,
    Stamp,
    after_failure,
    backoff_s,
    can_restart,
    cancelled_for_stall,
    dead_letter_category,
    pipeline_end,
    progress_counts,
    progress_due,
    progressed,
    restart_wait_s,
    source_label,
    stall_reason,
    stalled,
    start_moves_watch,
    type_label,
    watch_at_failure,
)
from torchrelay.services.monitor.settings import MonitorOptions
from torchrelay.services.monitor.sweeps import SweepMonitor
from torchrelay.shared.bus.port import Publish
from torchrelay.shared.errors import AlreadyExists, StaleRevision, TransientError
from torchrelay.shared.events import (
    EVENT_TYPES,
    AnyEvent,
    DatasetIngestRequested,
    DatasetRejected,
    DatasetStaged,
    DeadLettered,
    ModelDeployed,
    ModelRolloutFailed,
    ModelRolloutStarted,
    ModelUndeployed,
    PipelineSubmitted,
    TrainCancelRequested,
    TrainCompleted,
    TrainFailed,
    TrainProgressed,
    TrainRequested,
    TrainRestartRequested,
    TrainStarted,
)
from torchrelay.shared.events.data import (
    TrainCancelRequestedData,
    TrainFailedData,
    TrainRestartRequestedData,
)
from torchrelay.shared.pipelines import PipelineRecord, Submission, judge_submission, pipeline_key
from torchrelay.shared.runs import RunRecord, restart_event_id
from torchrelay.shared.state import Leases, State, Store, Versioned, key_part
from torchrelay.shared.sweep_state import submission_refusal

log = structlog.get_logger("torchrelay.monitor")
RESTART_DUE_SLACK_S = 0.1
"""A restart due within this is asked for now (a redelivery is never early, but clocks tick)."""
_IDS = uuid.UUID("9a4b2c1d-3e5f-4a6b-8c7d-0e1f2a3b4c5d")
STAGE_BUCKETS_S = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
RECONCILE_LEASE = "monitor.reconcile"


class EventMetrics:
    """Every event on the bus, by type and producing service; dead letters; stage times;
    training progress of active runs; active model versions."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        """Where the sweeps' metrics go too (:class:`SweepMonitor`)."""
        self._known = frozenset(EVENT_TYPES)
        self.events = Counter(
            "torchrelay_events_total",
            "Events seen on the bus, by type and producing service.",
            ["type", "source"],
            registry=registry,
        )
        self.dead = Counter(
            "torchrelay_dead_letters_total",
            "Events given up on, by the consumer that gave up, the original type and why.",
            ["consumer", "original_type", "reason"],
            registry=registry,
        )
        self.stage = Histogram(
            "torchrelay_stage_duration_seconds",
            "Time from one pipeline stage's event to the next (staging, queueing for training, "
            "training, rollout).",
            ["stage"],
            buckets=STAGE_BUCKETS_S,
            registry=registry,
        )
        self.pipeline = Histogram(
            "torchrelay_pipeline_duration_seconds",
            "Time from a pipeline's submission to its end (deployed, or trained when it does "
            "not deploy), by how it ended.",
            ["status"],
            buckets=STAGE_BUCKETS_S,
            registry=registry,
        )
        self.loss = Gauge(
            "torchrelay_train_loss",
            "Last reported loss of an active run.",
            ["run"],
            registry=registry,
        )
        self.samples = Gauge(
            "torchrelay_train_samples_per_second",
            "Last reported throughput of an active run.",
            ["run"],
            registry=registry,
        )
        self.last_progress = Gauge(
            "torchrelay_train_last_progress_timestamp_seconds",
            "When an active run last reported progress (Unix time).",
            ["run"],
            registry=registry,
        )
        self.restarts = Counter(
            "torchrelay_train_restarts_total",
            "Restarts the monitor asked for, by cause (failed, stalled).",
            ["cause"],
            registry=registry,
        )
        self.run_restarts = Gauge(
            "torchrelay_train_run_restarts",
            "Restarts used so far by an active run.",
            ["run"],
            registry=registry,
        )
        self.given_up = Counter(
            "torchrelay_train_given_up_total",
            "Runs that ended failed with no restart left.",
            registry=registry,
        )
        self.active_version = Gauge(
            "torchrelay_model_active_version",
            "1 for the version that serves a model.",
            ["model", "version"],
            registry=registry,
        )

    def count(self, event: AnyEvent) -> None:
        self.events.labels(event.type, source_label(event.source)).inc()
        if isinstance(event, DeadLettered):
            self.dead.labels(
                event.data.consumer,
                type_label(event.data.original_type, self._known),
                dead_letter_category(event.data.reason),
            ).inc()

    def forget_run(self, run_id: str) -> None:
        """Active-run series go when the run ends: labels stay bounded by active runs."""
        for gauge in (self.loss, self.samples, self.last_progress, self.run_restarts):
            try:
                gauge.remove(run_id)
            except KeyError:
                continue


class Monitor:
    def __init__(
        self,
        *,
        metrics: EventMetrics,
        state: State,
        publish: Publish,
        options: MonitorOptions,
        source: str,
        instance: str,
        reconciled: Counter,
        retain_s: float | None = None,
    ) -> None:
        self.metrics = metrics
        self._reconciled = reconciled
        self.watches: Store[RunWatch] = state.store("monitor", RunWatch)
        self.stamps: Store[Stamp] = state.store("monitor", Stamp)
        self._retain_s = retain_s
        """How long an ended run's watch is kept (None: for good)."""
        self._watched = self.watches.live(lambda watch: watch.state != "ended", prefix="runs")
        """The runs being watched (running or stalled), followed by a KV watch."""
        self.runs: Store[RunRecord] = state.store("runs", RunRecord)
        self._open_runs = self.runs.live(lambda run: run.status == "running" or run.restart_due)
        """The train service's runs that are running or due a restart: the truth that
        reconciliation holds the watches and the bus to."""
        self.pipelines: Store[PipelineRecord] = state.store("pipelines", PipelineRecord)
        self._leases: Leases = state.leases
        self._publish = publish
        self._options = options
        self._source = source
        self._instance = instance
        self._versions: dict[str, str] = {}
        self.sweeps = SweepMonitor(
            state=state, publish=publish, source=source, registry=metrics.registry
        )

    async def on_event(self, event: AnyEvent) -> None:
        if event.pipelineid is not None:
            await self._pipeline(event, event.pipelineid)
        handler = {
            DatasetIngestRequested: self._ingest_requested,
            TrainRequested: self._train_requested,
            DatasetStaged: self._staged,
            DatasetRejected: self._staged,
            TrainStarted: self._started,
            TrainProgressed: self._progressed,
            TrainCompleted: self._completed,
            TrainFailed: self._failed,
            ModelRolloutStarted: self._rollout_started,
            ModelDeployed: self._rollout_ended,
            ModelRolloutFailed: self._rollout_ended,
            ModelUndeployed: self._undeployed,
            DeadLettered: self._dead_lettered,
        }.get(type(event))
        if handler is not None:
            await handler(event)
        # Once handled: an event that comes back (a restart not due yet, a crash) counts once.
        self.metrics.count(event)

    async def _dead_lettered(self, event: AnyEvent) -> None:
        data = event.data
        # One line per dead letter, whichever replica gave up: where the original is and how
        # to replay it once its cause is fixed.
        log.warning(
            "deadletter.recorded",
            consumer=data.consumer,
            reason=data.reason,
            original_subject=data.original_subject,
            original_id=data.original_id,
            original_sequence=data.original_sequence,
            original_size_bytes=data.original_size_bytes,
            replay=f"torchrelay deadletters replay {data.original_sequence}",
        )

    # --- stage times -----------------------------------------------------------------------

    async def _pipeline(self, event: AnyEvent, pipeline_id: str) -> None:
        key = f"pipeline.{key_part(pipeline_id)}"
        if isinstance(event, PipelineSubmitted):
            # Only the submission that owns the pipeline starts its clock: a repeat (a no-op)
            # or a conflicting spec (refused) would restart it, or leave a clock behind that
            # no end ever stops.
            record = await self.pipelines.get(pipeline_key(pipeline_id))
            verdict = judge_submission(record.value if record else None, event.id, event.data.spec)
            if verdict not in {Submission.NEW, Submission.REDELIVERY}:
                return
            if submission_refusal(pipeline_id, event.data.spec) is not None:
                return  # ingest refuses it (pipeline.rejected): nothing will end a clock
            last = "deploy" if event.data.spec.deploy.enabled else "train"
            with contextlib.suppress(AlreadyExists):  # a redelivery: the clock runs already
                sweep = event.data.spec.sweep is not None
                await self.stamps.create(key, Stamp(at=event.time, last_stage=last, sweep=sweep))
            return
        if not isinstance(event, PIPELINE_ENDINGS):
            return  # the clock stops only on an ending: no read for the many events between
        stamp = await self.stamps.get(key)
        if stamp is None:
            return
        status = pipeline_end(event, stamp.value.last_stage, sweep=stamp.value.sweep)
        if status is None:
            return
        with contextlib.suppress(StaleRevision):  # a replica or a redelivery got there first
            await self.stamps.delete(key, revision=stamp.revision)
            seconds = (event.time - stamp.value.at).total_seconds()
            self.metrics.pipeline.labels(status).observe(seconds)

    async def _staged(self, event: AnyEvent) -> None:
        if event.data.request_id is None:
            return  # staged without a request (nothing was timed): nothing to observe
        started = await self._stamp(f"ingest.{key_part(event.data.request_id)}")
        if started is not None:
            self.metrics.stage.labels("staging").observe((event.time - started).total_seconds())

    async def _rollout_started(self, event: AnyEvent) -> None:
        await self._put_stamp(f"rollout.{key_part(event.causationid or event.id)}", event.time)

    async def _rollout_ended(self, event: AnyEvent) -> None:
        started = await self._stamp(f"rollout.{key_part(event.causationid or event.id)}")
        if started is not None:
            self.metrics.stage.labels("rollout").observe((event.time - started).total_seconds())
        if isinstance(event, ModelDeployed):
            model, version = event.data.model_name, event.data.version
            previous = self._versions.get(model)
            if previous is not None and previous != version:
                self.metrics.active_version.labels(model, previous).set(0)
            self._versions[model] = version
            self.metrics.active_version.labels(model, version).set(1)

    async def _undeployed(self, event: AnyEvent) -> None:
        """A model taken down serves no version: the one it served (and any this replica saw
        serve last) drops to 0."""
        model = event.data.model_name
        for version in {event.data.version, self._versions.pop(model, event.data.version)}:
            self.metrics.active_version.labels(model, version).set(0)

    async def _ingest_requested(self, event: AnyEvent) -> None:
        await self._put_stamp(f"ingest.{key_part(event.data.request_id)}", event.time)

    async def _train_requested(self, event: AnyEvent) -> None:
        if event.data.run_id is not None:
            await self._put_stamp(f"train.{key_part(event.data.run_id)}", event.time)

    async def _stamp(self, key: str) -> datetime | None:
        stamp = await self.stamps.get(key)
        return stamp.value.at if stamp else None

    async def _put_stamp(self, key: str, at: datetime) -> None:
        await self.stamps.put(key, Stamp(at=at))

    # --- runs --------------------------------------------------------------------------------

    async def _started(self, event: AnyEvent) -> None:
        data = event.data
        if data.attempt == 0:
            requested = await self._stamp(f"train.{key_part(data.run_id)}")
            if requested is not None:
                self.metrics.stage.labels("queued").observe(
                    (event.time - requested).total_seconds()
                )

        def change(current: RunWatch | None) -> RunWatch | None:
            if not start_moves_watch(current, data.attempt):
                return None  # late or repeated: the watch is past this start already
            return RunWatch(
                run_id=data.run_id,
                attempt=data.attempt,
                max_restarts=data.max_restarts,
                state="running",
                started_at=current.started_at if current else event.time,
                attempt_started_at=event.time,
                pipeline_id=event.pipelineid,
            )

        stored = await self.watches.mutate(_run_key(data.run_id), change)
        if stored is not None and stored.value.attempt == data.attempt:
            self.metrics.run_restarts.labels(data.run_id).set(data.attempt)

    async def _progressed(self, event: AnyEvent) -> None:
        data = event.data
        self.metrics.loss.labels(data.run_id).set(math.nan if data.loss is None else data.loss)
        self.metrics.samples.labels(data.run_id).set(data.samples_per_s)
        self.metrics.last_progress.labels(data.run_id).set(event.time.timestamp())
        await self.sweeps.progressed(event)

        every_s = self._options.progress_every_s
        key = _run_key(data.run_id)
        # Most reports change nothing a stall check reads: tell from the live view, without a
        # request. The view trails the bucket by a moment, so a report it skips is at most
        # ``every_s`` from the last one written; anything else (a report due, of another
        # attempt, of a run the view does not hold or a view not started) is judged again on
        # the stored value.
        seen = self._watched.get(key)
        if (
            seen is not None
            and progress_counts(seen.value, event.time)
            and not progress_due(seen.value, event.time, every_s)
        ):
            return

        def change(current: RunWatch | None) -> RunWatch | None:
            if current is None or not progress_due(current, event.time, every_s):
                return None
            return current.model_copy(update={"last_progress_at": event.time})

        await self.watches.mutate(key, change)

    async def _completed(self, event: AnyEvent) -> None:
        watch = await self.watches.get(_run_key(event.data.run_id))
        if watch is not None:
            seconds = (event.time - watch.value.started_at).total_seconds()
            self.metrics.stage.labels("training").observe(seconds)
            await self._end(watch.value)
        self.metrics.forget_run(event.data.run_id)

    async def _failed(self, event: AnyEvent) -> None:
        data: TrainFailedData = event.data
        current = await self.watches.get(_run_key(data.run_id))
        watch = watch_at_failure(current.value if current else None, data.attempt)
        if watch is None:  # no start of this run was handled yet: its record says what it is
            run = await self.runs.get(key_part(data.run_id))
            if run is not None and run.value.attempt == data.attempt:
                watch = _watch_of(run.value, None)
        recovery = after_failure(watch, attempt=data.attempt, final=data.final)
        if recovery is Recovery.IGNORE:
            return
        if recovery is Recovery.END or watch is None:
            if watch is not None:
                await self._end(watch)
            if not await self.sweeps.halted(event.pipelineid, data.run_id):
                self.metrics.given_up.inc()  # a trial its sweep stopped was not given up on
            self.metrics.forget_run(data.run_id)
            return
        silent = stall_reason(
            watch,
            after_s=self._options.stall_after_s,
            start_after_s=self._options.start_timeout_s,
        )
        if recovery is Recovery.GIVE_UP:
            await self._give_up(
                watch, f"stalled: {silent}; its {watch.max_restarts} restarts are used"
            )
            return
        if cancelled_for_stall(watch, data.attempt):
            await self._restart(watch, "stalled", silent, failed_at=event.time)
        else:
            await self._restart(watch, "failed", data.reason, failed_at=event.time)

    async def _restart(
        self, watch: RunWatch, cause: str, reason: str, *, failed_at: datetime
    ) -> None:
        """Ask for the next attempt once its backoff is over. Until then the failure event
        goes back to the bus with a delay (no handler waits, and a replica that dies meanwhile
        loses nothing: whichever replica gets it next asks)."""
        attempt = watch.attempt + 1
        wait = restart_wait_s(
            failed_at,
            datetime.now(UTC),
            attempt,
            base_s=self._options.backoff_base_s,
            cap_s=self._options.backoff_cap_s,
            progressed=progressed(watch),
        )
        if wait > RESTART_DUE_SLACK_S:
            log.info("run.restart_due", run_id=watch.run_id, attempt=attempt, in_s=wait)
            raise TransientError(
                f"restart {attempt} of run {watch.run_id} is due in {wait:.1f}s", delay_s=wait
            )
        log.info("run.restarting", run_id=watch.run_id, attempt=attempt, cause=cause)
        self.metrics.restarts.labels(cause).inc()
        await self._ask_restart(watch.run_id, attempt, watch.pipeline_id, reason)

    async def _ask_restart(
        self, run_id: str, attempt: int, pipeline_id: str | None, reason: str
    ) -> bool:
        """Publish the request for restart ``attempt``; False if the stream holds it already
        (its id comes from the run and attempt: two replicas, a redelivery or reconciliation
        ask once)."""
        return await self._publish(
            TrainRestartRequested(
                id=restart_event_id(run_id, attempt),
                source=self._source,
                subject=run_id,
                pipelineid=pipeline_id,
                data=TrainRestartRequestedData(run_id=run_id, reason=reason[:512], attempt=attempt),
            )
        )

    async def _give_up(self, watch: RunWatch, reason: str) -> None:
        await self._end(watch)
        self.metrics.given_up.inc()
        self.metrics.forget_run(watch.run_id)
        await self._publish(
            TrainFailed(
                id=str(uuid.uuid5(_IDS, f"gave-up:{watch.run_id}:{watch.attempt}")),
                source=self._source,
                subject=watch.run_id,
                pipelineid=watch.pipeline_id,
                data=TrainFailedData(
                    run_id=watch.run_id, attempt=watch.attempt, reason=reason, final=True
                ),
            )
        )

    async def _end(self, watch: RunWatch) -> None:
        await self.watches.put(
            _run_key(watch.run_id),
            watch.model_copy(update={"state": "ended"}),
            ttl_s=self._retain_s,
        )

    # --- reconciliation ------------------------------------------------------------------------

    async def reconcile(self, stop: asyncio.Event) -> None:
        """One replica at a time (a lease), every ``stall_check_s``: silent runs are cancelled
        (a restart cancel while restarts are left; the cancellation's train.failed then leads
        to a restart, or with none left to a final failure), and runs that no event in flight
        will move are moved on through the normal events (:meth:`reconcile_once`). The live
        views it reads are followed meanwhile, the running sweeps' too (every replica runs this
        loop, holding the lease or not: progress and the metrics read that view)."""
        async with self._watched, self._open_runs, self.sweeps.running:
            while not stop.is_set():
                lease = await self._leases.acquire(
                    RECONCILE_LEASE, self._instance, ttl_s=self._options.stall_check_s * 3
                )
                if lease is not None:
                    try:
                        await self.reconcile_once()
                    finally:
                        await self._leases.release(lease)
                try:
                    async with asyncio.timeout(self._options.stall_check_s):
                        await stop.wait()
                except TimeoutError:
                    continue

    async def reconcile_once(self) -> None:
        """One round over the runs the train service has not settled (its ``runs`` bucket is
        the truth) and the runs this monitor watches. What it moves on is counted in
        ``torchrelay_reconciled_total{kind}``:

        - ``restart``: an attempt ended non-final, its restart is overdue and none has started
          (the failure's event was given up on, or its handler kept dying);
        - ``watch``: an attempt runs that the monitor never heard start (its stall clock would
          be wrong);
        - ``ended``: the monitor watches a run that is over (it missed how it ended);
        - ``cancel``: a stalled attempt whose cancel has not taken effect is cancelled again.
        """
        now = datetime.now(UTC)
        open_runs = {item.value.run_id: item.value for item in self._open_runs.items()}
        for run in open_runs.values():
            await self._reconcile_run(run, now)
        for item in self._watched.items():
            await self._reconcile_watch(item, open_runs.get(item.value.run_id), now)

    async def _reconcile_run(self, run: RunRecord, now: datetime) -> None:
        quiet_s = (now - run.updated).total_seconds()
        grace_s = self._options.reconcile_grace_s
        if run.status == "running":
            found = await self.watches.get(_run_key(run.run_id))
            watch = found.value if found else None
            behind = watch is None or (watch.state != "ended" and watch.attempt < run.attempt)
            if behind and quiet_s > grace_s:
                await self.watches.put(_run_key(run.run_id), _watch_of(run, watch))
                log.warning("run.reconciled", run_id=run.run_id, kind="watch")
                self._reconciled.labels("watch").inc()
            return
        if not run.restart_due or not run.announced:
            return  # announcing is the train service's part (its reclaim)
        attempt = run.attempt + 1
        due_s = backoff_s(
            attempt, base_s=self._options.backoff_base_s, cap_s=self._options.backoff_cap_s
        )
        if quiet_s <= due_s + grace_s:
            return
        reason = run.reason or f"attempt {run.attempt} failed"
        if await self._ask_restart(run.run_id, attempt, run.pipeline_id, reason):
            log.warning("run.reconciled", run_id=run.run_id, kind="restart", attempt=attempt)
            self._reconciled.labels("restart").inc()

    async def _reconcile_watch(
        self, item: Versioned[RunWatch], run: RunRecord | None, now: datetime
    ) -> None:
        watch = item.value
        grace_s = self._options.reconcile_grace_s
        if run is None:  # not in the view of open runs: over, or the view is behind
            found = await self.runs.get(key_part(watch.run_id))
            run = found.value if found else None
            if run is not None and run.over and run.announced:
                if (now - run.updated).total_seconds() > grace_s:  # else: its event is on its way
                    await self._end_missed(watch, run)
                return
        if run is not None and (run.status != "running" or run.attempt != watch.attempt):
            return  # the run moved on: the events about it (or the train service) move it
        # The written clock may trail the last report by up to progress_every_s (reports in
        # between are not written): a stall is never called early, and at most that late.
        after_s = self._options.stall_after_s + self._options.progress_every_s
        start_after_s = self._options.start_timeout_s
        if watch.state == "running":
            if stalled(watch, now, after_s=after_s, start_after_s=start_after_s):
                await self._cancel_stalled(item)
            return
        # Stalled and cancelled, and the attempt still runs: its cancel went missing.
        overdue = stalled(
            watch.model_copy(update={"state": "running"}),
            now,
            after_s=2 * after_s + grace_s,
            start_after_s=start_after_s + after_s + grace_s,
        )
        if overdue and await self._publish(self._stall_cancel(watch, again=True)):
            log.warning("run.reconciled", run_id=watch.run_id, kind="cancel")
            self._reconciled.labels("cancel").inc()

    async def _end_missed(self, watch: RunWatch, run: RunRecord) -> None:
        """The run is over and the watch never heard how it ended."""
        if run.status != "succeeded":
            self.metrics.given_up.inc()
        await self._end(watch)
        self.metrics.forget_run(watch.run_id)
        log.warning("run.reconciled", run_id=watch.run_id, kind="ended", status=run.status)
        self._reconciled.labels("ended").inc()

    async def _cancel_stalled(self, item: Versioned[RunWatch]) -> None:
        watch = item.value
        try:
            await self.watches.update(
                item.key, watch.model_copy(update={"state": "stalled"}), revision=item.revision
            )
        except StaleRevision:  # another replica moved it; look again next round
            return
        log.warning("run.stalled", run_id=watch.run_id, attempt=watch.attempt)
        await self._publish(self._stall_cancel(watch, again=False))

    def _stall_cancel(self, watch: RunWatch, *, again: bool) -> TrainCancelRequested:
        name = f"stall-cancel:{watch.run_id}:{watch.attempt}" + (":again" if again else "")
        return TrainCancelRequested(
            id=str(uuid.uuid5(_IDS, name)),
            source=self._source,
            subject=watch.run_id,
            pipelineid=watch.pipeline_id,
            # With a restart left the run goes on: the attempt's train.failed is not final,
            # and nothing shows the pipeline failed on the way.
            data=TrainCancelRequestedData(
                run_id=watch.run_id, reason="stalled", restart=can_restart(watch)
            ),
        )


def _watch_of(run: RunRecord, watch: RunWatch | None) -> RunWatch:
    """A watch of the run's current attempt, from its record (the monitor missed its start)."""
    return RunWatch(
        run_id=run.run_id,
        attempt=run.attempt,
        max_restarts=run.spec.max_restarts,
        state="running",
        started_at=watch.started_at if watch else run.updated,
        attempt_started_at=run.updated,
        pipeline_id=run.pipeline_id,
    )


def _run_key(run_id: str) -> str:
    return f"runs.{key_part(run_id)}"
