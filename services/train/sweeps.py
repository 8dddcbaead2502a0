"""Glue: a pipeline's sweep -> its trials as training runs, a few at a time -> the best trial.

A sweep lives in the ``sweeps`` bucket, not in a replica: every step is :meth:`Sweeps.advance`,
which reads the record and the trials' runs, applies what happened (a run that ended, a free
slot) in one compare-and-set, then does what the record says is still to do: launch the trials
it started (a run id per trial, so a launch repeated by another replica or a redelivery launches
one run), publish the events it has not published yet (each with an id of its own, so the
stream holds one copy), and at the end write the pipeline's train stage. Whatever replica dies
wherever, the next ``advance`` (a redelivered event, or the loop over open sweeps) carries on.

A trial is a run like any other: the monitor restarts it from its checkpoints, and it counts
once in its sweep whatever its restarts, since its run id does not change. The monitor also
stops it early (median stopping): it writes the reason into the trial, then cancels the run.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from datetime import UTC, datetime
from typing import NamedTuple

import structlog
from pydantic import JsonValue

from torchrelay.services.train.handlers import Trainer, pipeline_job
from torchrelay.services.train.suggest import OPTUNA_MISSING
from torchrelay.shared.bus.port import Publish
from torchrelay.shared.errors import AlreadyExists
from torchrelay.shared.events import (
    DatasetStaged,
    SweepCancelRequested,
    SweepCompleted,
    SweepStarted,
    SweepTrialStarted,
    SweepTrialStopped,
    TrainCancelRequested,
    TrainCompleted,
    TrainFailed,
)
from torchrelay.shared.events.data import (
    SweepCompletedData,
    SweepStartedData,
    SweepTrialStartedData,
    SweepTrialStoppedData,
    TrainCancelRequestedData,
    TrainCompletedData,
    TrialStopCode,
)
from torchrelay.shared.events.sweep import Value
from torchrelay.shared.pipelines import PipelineRecord, pipeline_key, record_stage
from torchrelay.shared.runs import RunRecord
from torchrelay.shared.runtime.loops import every
from torchrelay.shared.state import State, Store, key_part
from torchrelay.shared.sweep_state import (
    ENDED_WITHOUT_MODEL,
    SWEEP_PREFIX,
    SWEEPS,
    Suggest,
    SweepRecord,
    Trial,
    TrialHistory,
    cancel,
    conclude,
    end_trial,
    fill_slots,
    history_key,
    new_sweep,
    sweep_key,
    trial_run_id,
)

log = structlog.get_logger("torchrelay.train.sweeps")
_IDS = uuid.UUID("6d1f0b8e-2c4a-4f7e-9b35-0a8e7c6d5f41")


class Ending(NamedTuple):
    """How a trial's run ended: its objective, its model and metrics (completed) or why it
    failed."""

    objective: float | None
    model_version: str | None
    metrics: dict[str, float]
    failure: str | None
    cancelled: bool = False
    """The sweep's cancel ended the run (:func:`_cancelled_by_sweep`)."""


class Sweeps:
    def __init__(
        self,
        *,
        trainer: Trainer,
        state: State,
        publish: Publish,
        source: str,
        suggest: Suggest | None = None,
        retain_s: float | None = None,
        advance_every_s: float = 5.0,
        quiet_after_s: float = 30.0,
    ) -> None:
        self.trainer = trainer
        self.sweeps: Store[SweepRecord] = state.store(SWEEPS, SweepRecord)
        self.histories: Store[TrialHistory] = state.store(SWEEPS, TrialHistory)
        self.runs: Store[RunRecord] = state.store("runs", RunRecord)
        self.pipelines: Store[PipelineRecord] = state.store("pipelines", PipelineRecord)
        self._publish = publish
        self._source = source
        self._suggest = suggest
        self._retain_s = retain_s
        self._advance_every_s = advance_every_s
        self._quiet_after_s = quiet_after_s
        self._later: set[asyncio.Task[None]] = set()
        trainer.halted = self.halted
        self._open = self.sweeps.live(
            lambda sweep: sweep.status == "running" or not sweep.announced, prefix=SWEEP_PREFIX
        )
        """Sweeps not over (or whose end is not announced), followed by a KV watch."""

    # --- handlers ---------------------------------------------------------------------------

    async def on_dataset_staged(self, event: DatasetStaged) -> None:
        """A pipeline's dataset is ready: a sweep's pipeline starts its sweep, any other one
        its training run."""
        if event.pipelineid is None:
            return
        found = await self.pipelines.get(pipeline_key(event.pipelineid))
        if found is None:
            return
        pipeline = found.value
        if pipeline.spec.sweep is None:
            await self.trainer.train_pipeline(event, pipeline)
            return
        job = pipeline_job(pipeline, event.data.name, event.data.version)
        sweep_id = pipeline.pipeline_id
        if pipeline.spec.sweep.algorithm == "bayesian" and self._suggest is None:
            await record_stage(
                self.pipelines, sweep_id, "train", "failed", datetime.now(UTC),
                reason=OPTUNA_MISSING,
                retain_s=self._retain_s,
            )  # fmt: skip
            log.warning("sweep.refused", sweep_id=sweep_id, reason=OPTUNA_MISSING)
            spec = pipeline.spec.sweep
            await self._publish(
                SweepCompleted(
                    id=_event_id("completed", sweep_id),
                    **self._envelope(sweep_id, event.id),
                    data=SweepCompletedData(
                        sweep_id=sweep_id,
                        metric=spec.objective.metric,
                        direction=spec.objective.direction,
                        model_name=job.model_name,
                        completed=0,
                        stopped=0,
                        failed=0,
                        reason=OPTUNA_MISSING,
                    ),
                )
            )
            return
        record = new_sweep(sweep_id, pipeline.spec.sweep, job, datetime.now(UTC))
        try:
            await self.sweeps.create(sweep_key(sweep_id), record, ttl_s=None)
        except AlreadyExists:
            pass  # a redelivery: carry on from what is stored
        else:
            log.info("sweep.started", sweep_id=sweep_id, trials=len(record.trials))
        spec = pipeline.spec.sweep
        planned = len(record.trials) or spec.max_trials  # a grid may hold fewer; bayesian: all
        detail: dict[str, JsonValue] = {"sweep": sweep_id, "trials": planned}
        if job.workspace is not None:
            detail["workspace"] = job.workspace
        await record_stage(
            self.pipelines, sweep_id, "train", "running", datetime.now(UTC), detail=detail
        )
        await self._publish(
            SweepStarted(
                id=_event_id("started", sweep_id),
                **self._envelope(sweep_id, event.id),
                data=SweepStartedData(
                    sweep_id=sweep_id,
                    algorithm=spec.algorithm,
                    trials=planned,
                    parallel=spec.parallel,
                    metric=spec.objective.metric,
                    direction=spec.objective.direction,
                    dataset=job.dataset,
                ),
            )
        )
        await self.advance(sweep_id, event.id)

    async def on_run_ended(self, event: TrainCompleted | TrainFailed) -> None:
        """A run ended: if it is a sweep's trial (and its end is final), the sweep moves on."""
        if event.pipelineid is None:
            return
        if isinstance(event, TrainFailed) and not event.data.final:
            return  # the monitor restarts it: still the same trial, running
        key = sweep_key(event.pipelineid)
        seen = self._open.get(key)
        sweep = seen.value if seen is not None else None
        if sweep is None:  # the view may trail the bucket by a moment
            found = await self.sweeps.get(key)
            sweep = found.value if found is not None else None
        if sweep is None or sweep.trial_of(event.data.run_id) is None:
            return
        await self.advance(sweep.sweep_id, event.id)

    async def on_cancel_requested(self, event: SweepCancelRequested) -> None:
        """Stop a sweep: no trial starts any more, a ``train.cancel.requested`` goes out for
        each running trial (their runs end cancelled, the trials failed), then the sweep ends
        without a best trial and its pipeline fails."""
        sweep_id, reason = event.data.sweep_id, event.data.reason
        now = datetime.now(UTC)

        def cancelling(current: SweepRecord | None) -> SweepRecord | None:
            if current is None:
                return None
            updated = cancel(current, reason, now)
            return None if updated is current else updated

        await self.sweeps.mutate(sweep_key(sweep_id), cancelling)
        sweep = await self.advance(sweep_id, event.id)  # launches what was started already
        if sweep is None:
            log.info("sweep.cancel_unknown", sweep_id=sweep_id)
            return
        # One request per trial: each goes (and comes back) to the replica that runs it, on
        # its own deliveries, whatever happens to the others.
        for trial in sweep.trials:
            if trial.status == "running":
                await self._publish(
                    TrainCancelRequested(
                        id=_event_id("cancel", sweep_id, trial.index),
                        source=self._source,
                        subject=trial.run_id,
                        pipelineid=sweep_id,
                        causationid=event.id,
                        data=TrainCancelRequestedData(
                            run_id=trial.run_id, reason=f"sweep cancelled: {reason}"[:512]
                        ),
                    )
                )
        log.info("sweep.cancelling", sweep_id=sweep_id, reason=reason)

    async def halted(self, run: RunRecord) -> str | None:
        """Why a trial's run that awaits a restart must not get it: the monitor stopped the
        trial meanwhile, or the sweep was cancelled (the sweep then moves on at once)."""
        if run.pipeline_id is None or run.trial is None:
            return None
        found = await self.sweeps.get(sweep_key(run.pipeline_id))
        if found is None or run.trial >= len(found.value.trials):
            return None
        sweep, trial = found.value, found.value.trials[run.trial]
        reason = _halt_reason(sweep, trial)
        if reason is not None and trial.status == "running":
            self._advance_later(sweep.sweep_id)  # the trial ends now, not at the next round
        return reason

    def _advance_later(self, sweep_id: str) -> None:
        task = asyncio.create_task(self._advance_quietly(sweep_id), name=f"sweep:{sweep_id}")
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    async def _advance_quietly(self, sweep_id: str) -> None:
        try:
            await self.advance(sweep_id, None)
        except Exception:  # the loop over open sweeps tries again
            log.exception("sweep.advance_failed", sweep_id=sweep_id)

    async def keep_moving(self, stop: asyncio.Event) -> None:
        """Background loop: a sweep that nothing moved for ``quiet_after_s`` is advanced (an
        event about it was given up on, or the replica handling it died mid-way)."""
        async with self._open:
            await every(self._advance_every_s, stop, self.advance_quiet, name="train.sweeps")

    async def advance_quiet(self) -> list[str]:
        now = datetime.now(UTC)
        moved = []
        for item in self._open.items():
            sweep = item.value
            if (now - sweep.updated).total_seconds() > self._quiet_after_s:
                try:
                    await self.advance(sweep.sweep_id, None)
                except Exception:  # one sweep's trouble must not hold up the others
                    log.exception("sweep.advance_failed", sweep_id=sweep.sweep_id)
                    continue
                moved.append(sweep.sweep_id)
        return moved

    # --- the one step -------------------------------------------------------------------------

    async def advance(self, sweep_id: str, cause: str | None) -> SweepRecord | None:
        """Bring the sweep up to date with its trials' runs, start trials into free slots,
        launch and announce what is unannounced, and end the sweep when every trial ended."""
        key = sweep_key(sweep_id)
        found = await self.sweeps.get(key)
        if found is None:
            return None
        endings = await self._endings(found.value)
        suggest = await self._suggestions(found.value, endings)

        def change(current: SweepRecord | None) -> SweepRecord | None:
            if current is None:
                return None
            now = datetime.now(UTC)
            updated = conclude(fill_slots(_ended(current, endings, now), now, suggest), now)
            return None if updated == current else updated

        stored = await self.sweeps.mutate(key, change, ttl_s=self._ttl)
        sweep = stored.value if stored is not None else found.value
        for trial in sweep.trials:
            if not trial.announced:
                await self._announce_trial(sweep, trial, cause)
        if not sweep.announced:
            await self._announce_end(sweep, cause)
        return sweep

    async def _suggestions(self, sweep: SweepRecord, endings: dict[int, Ending]) -> Suggest | None:
        """For a bayesian sweep with free slots: Optuna's suggestions for them, asked in a
        thread before the compare-and-set (TPE takes a while, and a retried compare-and-set
        must not ask again), by trial index; the plain ``suggest`` for any other index. None
        when asking failed: no trial is added this time."""
        plain = self._suggest
        if plain is None or sweep.spec.algorithm != "bayesian":
            return plain
        ended = _ended(sweep, endings, datetime.now(UTC))
        wanted = min(
            sweep.spec.parallel - ended.count("running"),
            sweep.spec.max_trials - len(ended.trials),
        )
        if ended.status != "running" or ended.cancelled is not None or wanted <= 0:
            return plain

        def ask() -> dict[int, dict[str, Value]]:
            asked: dict[int, dict[str, Value]] = {}
            record = ended
            for _ in range(wanted):
                index = len(record.trials)
                asked[index] = plain(record)
                trial = Trial(
                    index=index,
                    params=asked[index],
                    run_id=trial_run_id(record.sweep_id, index),
                    status="running",
                )
                record = record.model_copy(update={"trials": [*record.trials, trial]})
            return asked

        try:
            ready = await asyncio.to_thread(ask)
        except Exception:  # the trials' endings are still recorded; suggesting is tried again
            log.exception("sweep.suggest_failed", sweep_id=sweep.sweep_id)
            return None
        # By trial index: a retried compare-and-set gets the same suggestion for a trial.
        return lambda record: ready.get(len(record.trials)) or plain(record)

    def _ttl(self, sweep: SweepRecord) -> float | None:
        return self._retain_s if sweep.status != "running" and sweep.announced else None

    async def _endings(self, sweep: SweepRecord) -> dict[int, Ending]:
        """How each running trial's run ended, for :func:`end_trial` (running ones left out).
        A run's recorded outcome is final as soon as it is written (its event may still be on
        its way); a trial the monitor stopped while its run awaited a restart ends stopped."""
        endings: dict[int, Ending] = {}
        for trial in sweep.trials:
            if trial.status != "running" or not trial.announced:
                continue  # unannounced: launched below, if it is not yet
            found = await self.runs.get(key_part(trial.run_id))
            run = found.value if found is not None else None
            if run is None:  # launched (it was announced), and its record is gone since
                reason = f"the record of run {trial.run_id} is gone (expired or removed)"
                endings[trial.index] = Ending(None, None, {}, reason)
                continue
            halt = _halt_reason(sweep, trial) if run.restart_due else None
            if halt is not None:  # no restart for it: its failure becomes final first
                run = await self.trainer.end_halted(run, halt)
                if run is None:
                    continue  # gone meanwhile: the next round says so
            if not run.over:
                continue  # running, or restarting
            last = await self._last_objective(sweep, trial)
            if isinstance(run.outcome, TrainCompletedData):
                final = run.outcome.metrics.get(sweep.spec.objective.metric)
                objective = final if final is not None else last
                metrics = dict(run.outcome.metrics)
                endings[trial.index] = Ending(objective, run.outcome.model_version, metrics, None)
            else:
                reason = run.reason or (run.outcome.reason if run.outcome else "the run failed")
                cancelled = _cancelled_by_sweep(sweep, trial, run)
                endings[trial.index] = Ending(last, None, {}, reason, cancelled)
        return endings

    async def _last_objective(self, sweep: SweepRecord, trial: Trial) -> float | None:
        history = await self.histories.get(history_key(sweep.sweep_id, trial.index))
        if history is None or not history.value.points:
            return None
        value = history.value.points[-1][1]
        return value if math.isfinite(value) else None  # diverged: no objective to rank

    # --- what a transition leaves to do ---------------------------------------------------------

    async def _announce_trial(self, sweep: SweepRecord, trial: Trial, cause: str | None) -> None:
        envelope = self._envelope(sweep.sweep_id, cause)
        if trial.status == "running":
            await self.trainer.start(
                trial.run_id,
                sweep.trial_job(trial),
                sweep.sweep_id,
                cause or _event_id("launch", sweep.sweep_id, trial.index),
                trial=trial.index,
            )
            await self._publish(
                SweepTrialStarted(
                    id=_event_id("trial-started", sweep.sweep_id, trial.index),
                    **envelope,
                    data=SweepTrialStartedData(
                        sweep_id=sweep.sweep_id,
                        trial=trial.index,
                        run_id=trial.run_id,
                        hyperparameters=trial.params,
                    ),
                )
            )
            log.info("sweep.trial_started", sweep_id=sweep.sweep_id, trial=trial.index)
        elif trial.status in ENDED_WITHOUT_MODEL:
            await self._publish(
                SweepTrialStopped(
                    id=_event_id("trial-stopped", sweep.sweep_id, trial.index),
                    **envelope,
                    data=SweepTrialStoppedData(
                        sweep_id=sweep.sweep_id,
                        trial=trial.index,
                        run_id=trial.run_id,
                        code=_stop_code(trial),
                        reason=(trial.reason or "the run failed")[:512],
                        objective=trial.objective,
                    ),
                )
            )
            log.info(
                "sweep.trial_stopped",
                sweep_id=sweep.sweep_id,
                trial=trial.index,
                status=trial.status,
                reason=trial.reason,
            )

        def announced(current: SweepRecord | None) -> SweepRecord | None:
            if current is None:
                return None
            now_trial = current.trials[trial.index]
            if now_trial.announced or now_trial.status != trial.status:
                return None
            trials = list(current.trials)
            trials[trial.index] = now_trial.model_copy(update={"announced": True})
            return current.model_copy(update={"trials": trials})

        await self.sweeps.mutate(sweep_key(sweep.sweep_id), announced)

    async def _announce_end(self, sweep: SweepRecord, cause: str | None) -> None:
        winner = sweep.best_trial
        spec = sweep.spec
        metrics = dict(winner.metrics) if winner is not None else {}
        await self._retain_histories(sweep)
        data = SweepCompletedData(
            sweep_id=sweep.sweep_id,
            metric=spec.objective.metric,
            direction=spec.objective.direction,
            best_trial=winner.index if winner else None,
            run_id=winner.run_id if winner else None,
            hyperparameters=winner.params if winner else {},
            objective=winner.objective if winner else None,
            model_name=sweep.job.model_name,
            model_version=winner.model_version if winner else None,
            metrics=metrics,
            completed=sweep.count("completed"),
            stopped=sweep.count("stopped"),
            failed=sweep.count("failed"),
            cancelled=sweep.cancelled is not None,
            reason=None if winner is not None else _no_best(sweep)[:512],
        )
        now = datetime.now(UTC)
        if winner is not None and winner.model_version is not None:
            detail: dict[str, JsonValue] = {
                "model": sweep.job.model_name,
                "version": winner.model_version,
                "metrics": dict(metrics),
                "run_id": winner.run_id,
                "trial": winner.index,
                "hyperparameters": dict(winner.params),
            }
            await record_stage(
                self.pipelines, sweep.sweep_id, "train", "succeeded", now,
                detail=detail,
                retain_s=self._retain_s,
            )  # fmt: skip
        else:
            await record_stage(
                self.pipelines, sweep.sweep_id, "train", "failed", now,
                reason=_no_best(sweep),
                retain_s=self._retain_s,
            )  # fmt: skip
        await self._publish(
            SweepCompleted(
                id=_event_id("completed", sweep.sweep_id),
                **self._envelope(sweep.sweep_id, cause),
                data=data,
            )
        )
        log.info(
            "sweep.completed",
            sweep_id=sweep.sweep_id,
            best_trial=data.best_trial,
            objective=data.objective,
            completed=data.completed,
            stopped=data.stopped,
            failed=data.failed,
        )

        def announced(current: SweepRecord | None) -> SweepRecord | None:
            if current is None or current.announced:
                return None
            return current.model_copy(update={"announced": True})

        await self.sweeps.mutate(sweep_key(sweep.sweep_id), announced, ttl_s=self._ttl)

    async def _retain_histories(self, sweep: SweepRecord) -> None:
        """The trials' histories expire with the sweep's record: nothing appends to them once
        the sweep ended (the monitor only appends to running trials)."""
        if self._retain_s is None:
            return
        for trial in sweep.trials:
            key = history_key(sweep.sweep_id, trial.index)
            found = await self.histories.get(key)
            if found is not None:
                await self.histories.put(key, found.value, ttl_s=self._retain_s)

    def _envelope(self, sweep_id: str, cause: str | None) -> dict[str, str | None]:
        return {
            "source": self._source,
            "subject": sweep_id,
            "pipelineid": sweep_id,
            "causationid": cause,
        }


def _ended(sweep: SweepRecord, endings: dict[int, Ending], now: datetime) -> SweepRecord:
    """The sweep with its trials' run endings applied (:func:`end_trial`)."""
    for index, ending in endings.items():
        sweep = end_trial(
            sweep,
            index,
            now,
            objective=ending.objective,
            model_version=ending.model_version,
            metrics=ending.metrics,
            failure=ending.failure,
            cancelled=ending.cancelled,
        )
    return sweep


def _cancelled_by_sweep(sweep: SweepRecord, trial: Trial, run: RunRecord) -> bool:
    """Whether the sweep's cancel ended the trial's failed run: cancelled once the sweep was
    (the sweep asked for it), or its restart halted for the cancel (whichever replica halted
    it: the reason is on the run). A run that failed on its own was not, nor one cancelled
    while its sweep was not (a cancel of the run alone, or of a stalled run with no restart
    left): those trials fail."""
    if sweep.cancelled is None or trial.stop_requested is not None:
        return False
    return run.status == "cancelled" or run.reason == _halt_reason(sweep, trial)


def _halt_reason(sweep: SweepRecord, trial: Trial) -> str | None:
    """Why the trial's run gets no more restarts: stopped early, or its sweep cancelled."""
    if trial.stop_requested is not None:
        return trial.stop_requested
    return None if sweep.cancelled is None else f"sweep cancelled: {sweep.cancelled}"


def _no_best(sweep: SweepRecord) -> str:
    if sweep.cancelled is not None:
        return f"the sweep was cancelled: {sweep.cancelled}"
    return (  # a trial is cancelled only by its sweep's cancel, said above
        f"no trial of the sweep completed ({sweep.count('stopped')} stopped early, "
        f"{sweep.count('failed')} failed)"
    )


def _stop_code(trial: Trial) -> TrialStopCode:
    if trial.status == "stopped":
        return "early_stopped"
    return "cancelled" if trial.status == "cancelled" else "failed"


def _event_id(kind: str, sweep_id: str, index: int | None = None) -> str:
    """The id of one of the sweep's events: the same from every replica and every try."""
    name = f"{kind}:{sweep_id}" + ("" if index is None else f":{index}")
    return str(uuid.uuid5(_IDS, name))
