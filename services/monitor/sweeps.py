"""Glue for sweeps: a trial's progress -> its objective history -> median stopping (a stop
written into the trial, then a cancel); the running sweeps -> metrics at scrape time.

The train service owns the sweep (its record, its trials' runs); the monitor writes two things
only: each trial's history (``trial.<sweep>.<index>``, which it alone appends to) and a trial's
``stop_requested``, by compare-and-set, before it asks for the cancel, so whichever replica
sees the run end knows it was stopped, not failed.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Iterator

import structlog
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from torchrelay.services.monitor.domain import (
    best_objective,
    may_be_trial,
    request_stop,
    running_trial,
    stop_reason,
    trial_counts,
    with_report,
)
from torchrelay.shared.bus.port import Publish
from torchrelay.shared.events import AnyEvent, TrainCancelRequested
from torchrelay.shared.events.data import TrainCancelRequestedData, TrainProgressData
from torchrelay.shared.state import LiveView, State, Store
from torchrelay.shared.sweep_state import (
    SWEEP_PREFIX,
    SWEEPS,
    SweepRecord,
    TrialHistory,
    completed_histories,
    history_key,
    sweep_key,
)
from torchrelay.shared.sweeps import History, objective_value

log = structlog.get_logger("torchrelay.monitor.sweeps")
_IDS = uuid.UUID("3c0f5e7a-8b2d-4e61-9f4a-7d1c2b3a4e5f")
CACHED_SWEEPS = 64
"""Sweeps whose completed trials' histories a replica keeps in memory (the most recent)."""


def stop_event_id(run_id: str) -> str:
    """The id of the early stop's cancel request: one per run, so two replicas, a redelivery
    or a crash between writing the stop and publishing it put one request on the bus."""
    return str(uuid.uuid5(_IDS, f"early-stop:{run_id}"))


class SweepMonitor:
    """Trials' histories and their early stopping, over the ``sweeps`` bucket."""

    def __init__(
        self, *, state: State, publish: Publish, source: str, registry: CollectorRegistry
    ) -> None:
        self.records: Store[SweepRecord] = state.store(SWEEPS, SweepRecord)
        self.histories: Store[TrialHistory] = state.store(SWEEPS, TrialHistory)
        self.running: LiveView[SweepRecord] = self.records.live(
            lambda record: record.status == "running", prefix=SWEEP_PREFIX
        )
        """The running sweeps, followed by a KV watch: most progress is judged without a read
        of the record, and the metrics read it at scrape time."""
        self._publish = publish
        self._source = source
        self._finished: OrderedDict[str, dict[int, History]] = OrderedDict()
        """Completed trials' histories by sweep: a trial's history is final once it completed
        (only running trials' reports are appended), so each is read once per replica."""
        self.stopped = Counter(
            "torchrelay_sweep_trials_stopped_total",
            "Trials the monitor stopped early (median stopping), counted once per trial.",
            registry=registry,
        )
        registry.register(SweepCollector(self.running))

    async def progressed(self, event: AnyEvent) -> None:
        """Append the trial's objective to its history, then stop it if the sweep's rule says
        so. Progress of a run that is not a running trial changes nothing; of a run that cannot
        be a trial (see :func:`may_be_trial`), it sends no request either."""
        data: TrainProgressData = event.data
        if event.pipelineid is None:
            return
        record = await self._record(event.pipelineid, data.run_id)
        trial = None if record is None else running_trial(record, data.run_id)
        if record is None or trial is None:
            return
        value = objective_value(record.spec.objective.metric, loss=data.loss, metrics=data.metrics)
        if value is None:
            return  # this report lacks the objective (it may come in a later one)
        key = history_key(record.sweep_id, trial.index)
        stored = await self.histories.mutate(
            key, lambda current: with_report(current, data.step, value)
        )
        if record.spec.early_stopping is None:
            return
        history = stored.value.points if stored is not None else []
        if trial.stop_requested is not None:
            # Asked for already: ask again under the same id (the stream keeps one), in case
            # the replica that wrote the stop died before it published.
            await self._cancel(record.sweep_id, data.run_id, trial.stop_requested)
            return
        reason = stop_reason(record, history, await self._completed(record))
        if reason is not None:
            await self._stop(record.sweep_id, data.run_id, reason)

    async def halted(self, sweep_id: str | None, run_id: str) -> bool:
        """Whether the run's final failure is its sweep's doing (the trial was stopped early,
        or the sweep cancelled): routine, not a run given up on. From the live view, else
        (the sweep may have ended since) the bucket, for a run that may be a trial."""
        if sweep_id is None:
            return False
        seen = self.running.get(sweep_key(sweep_id))
        record = seen.value if seen is not None else None
        if record is None and may_be_trial(run_id, sweep_id):
            found = await self.records.get(sweep_key(sweep_id))
            record = found.value if found is not None else None
        if record is None or (trial := record.trial_of(run_id)) is None:
            return False
        return trial.stop_requested is not None or record.cancelled is not None

    async def _record(self, sweep_id: str, run_id: str) -> SweepRecord | None:
        """The sweep, from the live view when it shows the trial running; otherwise from the
        bucket (the view trails it by a moment), but only for a run that may be a trial."""
        seen = self.running.get(sweep_key(sweep_id))
        if seen is not None and running_trial(seen.value, run_id) is not None:
            return seen.value
        if not may_be_trial(run_id, sweep_id):
            return None
        found = await self.records.get(sweep_key(sweep_id))
        return found.value if found is not None else None

    async def _completed(self, record: SweepRecord) -> list[History]:
        cached = self._finished.pop(record.sweep_id, {})
        self._finished[record.sweep_id] = cached  # the most recent last
        while len(self._finished) > CACHED_SWEEPS:
            self._finished.popitem(last=False)
        for trial in record.trials:
            if trial.status == "completed" and trial.index not in cached:
                found = await self.histories.get(history_key(record.sweep_id, trial.index))
                cached[trial.index] = found.value.points if found is not None else []
        return completed_histories(record, cached)

    async def _stop(self, sweep_id: str, run_id: str, reason: str) -> None:
        """Write the stop into the trial, then ask for the cancel: the stop it holds (this
        one, or one written before by a replica that may have died before publishing)."""
        stored = await self.records.mutate(
            sweep_key(sweep_id), lambda current: request_stop(current, run_id, reason)
        )
        trial = None if stored is None else running_trial(stored.value, run_id)
        if trial is not None and trial.stop_requested is not None:
            await self._cancel(sweep_id, run_id, trial.stop_requested)

    async def _cancel(self, sweep_id: str, run_id: str, reason: str) -> None:
        published = await self._publish(
            TrainCancelRequested(
                id=stop_event_id(run_id),
                source=self._source,
                subject=run_id,
                pipelineid=sweep_id,
                data=TrainCancelRequestedData(run_id=run_id, reason=reason, restart=False),
            )
        )
        if published:  # not a duplicate: the first request for this trial
            log.info("sweep.trial_stopping", sweep_id=sweep_id, run_id=run_id, reason=reason)
            self.stopped.inc()


class SweepCollector(Collector):
    """Trials by status and the best objective so far of each running sweep, read from the
    live view at scrape time: the series of a sweep go when it ends (labels stay bounded by
    the running sweeps)."""

    def __init__(self, running: LiveView[SweepRecord]) -> None:
        self._running = running

    def collect(self) -> Iterator[GaugeMetricFamily]:
        trials = GaugeMetricFamily(
            "torchrelay_sweep_trials",
            "Trials of a running sweep, by status.",
            labels=["sweep", "status"],
        )
        objective = GaugeMetricFamily(
            "torchrelay_sweep_best_objective",
            "The best final objective among a running sweep's completed trials.",
            labels=["sweep", "metric"],
        )
        for record in self._running.values():
            for status, count in trial_counts(record).items():
                trials.add_metric([record.sweep_id, status], count)
            value = best_objective(record)
            if value is not None:
                objective.add_metric([record.sweep_id, record.spec.objective.metric], value)
        yield trials
        yield objective
