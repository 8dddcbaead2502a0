"""Pipeline records in the ``pipelines`` bucket: the spec, and each stage's status and times.

Pure: each service applies its stage's change through :func:`with_stage` inside a
compare-and-set update; the overall status follows from the stages.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from torchrelay.shared.events.data import PipelineSpec

if TYPE_CHECKING:
    from torchrelay.shared.state import Store

StageName = Literal["ingest", "train", "deploy"]
STAGES: tuple[StageName, ...] = ("ingest", "train", "deploy")
StageState = Literal["pending", "running", "succeeded", "failed", "skipped"]


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
    """The record after ``stage`` moves to ``status`` at ``at``."""
    current = record.stages[stage]
    updated = current.model_copy(
        update={
            "status": status,
            "started": current.started or at,
            "ended": at if status in {"succeeded", "failed", "skipped"} else None,
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
) -> None:
    """Apply one stage change with compare-and-set (a pipeline nobody stored is left alone)."""

    def change(current: PipelineRecord | None) -> PipelineRecord | None:
        if current is None:
            return None
        return with_stage(current, stage, status, at, detail=detail, reason=reason)

    await store.mutate(pipeline_key(pipeline_id), change)
