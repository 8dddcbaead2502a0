"""Pipeline records in the ``pipelines`` bucket: the spec, and each stage's status and times.

Pure: each service applies its stage's change through :func:`with_stage` inside a
compare-and-set update; the overall status follows from the stages. A stage only moves
forward, and a pipeline id names one spec for good (:func:`judge_submission`).
"""

from __future__ import annotations

import enum
import re
from datetime import datetime
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from torchrelay.shared.events.data import PipelineSpec

if TYPE_CHECKING:
    from torchrelay.shared.state import Store

MAX_RUN_ID = 64
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def is_run_id(text: str) -> bool:
    """Whether ``text`` can name a run. A run's model is stored under the run id as its
    version, so the id obeys a version's rule: letters, digits, '.', '_' and '-', starting with
    a letter or digit, at most 64 characters."""
    return len(text) <= MAX_RUN_ID and _RUN_ID.fullmatch(text) is not None


def train_run_id(pipeline_id: str) -> str:
    """The run id of a pipeline's training stage (a sweep's trials: ``trial_run_id``)."""
    return f"{pipeline_id}.train"


StageName = Literal["ingest", "train", "deploy"]
STAGES: tuple[StageName, ...] = ("ingest", "train", "deploy")
StageState = Literal["pending", "running", "succeeded", "failed", "skipped"]
FINISHED: frozenset[StageState] = frozenset({"succeeded", "failed", "skipped"})


class StageStatus(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    status: StageState = "pending"
    started: datetime | None = None
    ended: datetime | None = None
    detail: dict[str, JsonValue] = Field(default_factory=dict)
    reason: str | None = None

    @property
    def seconds(self) -> float | None:
        if self.started is None or self.ended is None:
            return None
        return (self.ended - self.started).total_seconds()


class PipelineRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    pipeline_id: str
    spec: PipelineSpec
    submitted: datetime
    submitted_event_id: str | None = None
    """The id of the ``pipeline.submitted`` event that created the record (None in records
    written before it was kept): tells a redelivery of that event from a new submission."""
    status: Literal["running", "succeeded", "failed"] = "running"
    stages: dict[StageName, StageStatus] = Field(
        default_factory=lambda: {name: StageStatus() for name in STAGES}
    )

    def overhead_s(self) -> float | None:
        """The platform's own time: from submission to the first stage starting, and from each
        stage's end to the next one starting."""
        marks = [self.submitted]
        total = 0.0
        for name in STAGES:
            stage = self.stages[name]
            if stage.status == "skipped":
                continue
            if stage.started is None:
                return None if self.status == "running" else total
            total += max(0.0, (stage.started - marks[-1]).total_seconds())
            if stage.ended is None:
                return total
            marks.append(stage.ended)
        return total


def with_stage(
    record: PipelineRecord,
    stage: StageName,
    status: StageState,
    at: datetime,
    *,
    detail: dict[str, JsonValue] | None = None,
    reason: str | None = None,
) -> PipelineRecord:
    """The record after ``stage`` moves to ``status`` at ``at``.

    Stages only move forward: a finished stage (succeeded, failed, skipped) keeps its outcome,
    times and details, and ``record`` itself is returned. Redeliveries and late events arrive
    after the outcome they would overwrite, so "running" again (or a second outcome) is stale.
    """
    current = record.stages[stage]
    if current.status in FINISHED:
        return record
    updated = current.model_copy(
        update={
            "status": status,
            "started": current.started or at,
            "ended": at if status in FINISHED else None,
            "detail": {**current.detail, **(detail or {})},
            "reason": reason if reason is not None else current.reason,
        }
    )
    stages = {**record.stages, stage: updated}
    if any(s.status == "failed" for s in stages.values()):
        overall: Literal["running", "succeeded", "failed"] = "failed"
    elif all(s.status in {"succeeded", "skipped"} for s in stages.values()):
        overall = "succeeded"
    else:
        overall = "running"
    return record.model_copy(update={"stages": stages, "status": overall})


class Submission(enum.StrEnum):
    """What a ``pipeline.submitted`` event means, given what its pipeline id already holds."""

    NEW = "new"
    """Nothing stored under the id: create the record and start the pipeline."""
    REDELIVERY = "redelivery"
    """The very event that created the record, delivered again: carry on with its work."""
    REPEATED = "repeated"
    """Another submission of the same spec under an existing id: nothing to do."""
    CONFLICTING = "conflicting_spec"
    """Another spec under an existing id: refused, the stored pipeline stays as it is."""


def judge_submission(
    existing: PipelineRecord | None, event_id: str, spec: PipelineSpec
) -> Submission:
    """Decide what a submission of ``spec`` by event ``event_id`` does to its pipeline id.

    A pipeline id names one spec for good. Records written before ``submitted_event_id`` was
    kept cannot tell a redelivery from a repeat: while their ingest stage has not finished they
    carry on (staging is idempotent per request), afterwards a repeat changes nothing.
    """
    if existing is None:
        return Submission.NEW
    if existing.spec != spec:
        return Submission.CONFLICTING
    if existing.submitted_event_id is None:
        unfinished = existing.stages["ingest"].status not in FINISHED
        return Submission.REDELIVERY if unfinished else Submission.REPEATED
    if existing.submitted_event_id == event_id:
        return Submission.REDELIVERY
    return Submission.REPEATED


def spec_differences(old: PipelineSpec, new: PipelineSpec) -> list[str]:
    """Dotted paths of the fields where ``new`` differs from ``old`` (sorted)."""
    found: list[str] = []

    def walk(a: JsonValue, b: JsonValue, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(a.keys() | b.keys()):
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        elif a != b:
            found.append(path or "<spec>")

    walk(old.model_dump(mode="json"), new.model_dump(mode="json"), "")
    return found


def conflict_reason(existing: PipelineRecord, spec: PipelineSpec, *, limit: int = 512) -> str:
    """Why a submission of ``spec`` under ``existing``'s id is refused, and what to do."""
    fields = spec_differences(existing.spec, spec)
    shown = ", ".join(fields[:8]) + (f" and {len(fields) - 8} more" if len(fields) > 8 else "")
    head = (
        f"pipeline {existing.pipeline_id!r} was already submitted "
        f"({existing.submitted.isoformat()}) with a different spec"
    )
    advice = (
        "; the stored pipeline is unchanged: submit the new spec under a new pipelineid "
        "(or without one)"
    )
    differs = f" (differs in {shown})"
    reason = head + differs + advice
    if len(reason) > limit:
        reason = head + advice
    return reason[:limit]


def pipeline_key(pipeline_id: str) -> str:
    from torchrelay.shared.state import key_part

    return key_part(pipeline_id)


async def record_stage(
    store: Store[PipelineRecord],
    pipeline_id: str,
    stage: StageName,
    status: StageState,
    at: datetime,
    *,
    detail: dict[str, JsonValue] | None = None,
    reason: str | None = None,
    retain_s: float | None = None,
) -> None:
    """Apply one stage change with compare-and-set. A pipeline nobody stored is left alone,
    and so is a stage that already finished (nothing is written). A pipeline that this change
    ends is kept ``retain_s`` seconds more (None: for good), then the server removes it."""

    def change(current: PipelineRecord | None) -> PipelineRecord | None:
        if current is None:
            return None
        updated = with_stage(current, stage, status, at, detail=detail, reason=reason)
        return None if updated is current else updated

    await store.mutate(
        pipeline_key(pipeline_id),
        change,
        ttl_s=lambda record: retain_s if record.status != "running" else None,
    )
