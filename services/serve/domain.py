"""Pure rules of serve: deployment records, the smoke input, what a rollback returns to, and
whether a trained model passes its pipeline's promotion gate."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, JsonValue, model_validator

from torchrelay.shared.events.data import PromotionGate
from torchrelay.shared.storage.files import ModelDescription


class DeploymentRecord(BaseModel):
    """A model's deployment in the ``deployments`` bucket."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    active_version: str | None = None
    previous_version: str | None = None
    endpoint: str | None = None
    replicas: int = 1
    status: str = "none"
    reason: str | None = None
    owner: str | None = None
    """The serve replica that rolled the active version out (or took it over)."""
    handle: str | None = None
    """The serving backend's handle of the active version (opaque: only the backend reads
    it): what the next rollout replaces, and what a replica describes or retires."""
    updated: datetime

    @model_validator(mode="before")
    @classmethod
    def _before_handles(cls, data: Any) -> Any:
        """Records written before handles named the local servers' ``port`` and ``servers``:
        they are read without them (the servers they named cannot be retired by handle)."""
        if isinstance(data, dict) and ("port" in data or "servers" in data):
            return {k: v for k, v in data.items() if k not in ("port", "servers")}
        return data


def smoke_request(description: ModelDescription) -> dict[str, Any]:
    """An inference request on the model's declared input signature: one zero sample."""
    spec = description.inputs[0]
    shape = [1 if dim == -1 else int(dim) for dim in spec.shape]
    count = 1
    for dim in shape:
        count *= dim
    zero: float | bool = False if spec.datatype == "BOOL" else 0
    return {
        "id": "smoke",
        "inputs": [
            {"name": spec.name, "shape": shape, "datatype": spec.datatype, "data": [zero] * count}
        ],
    }


def smoke_ok(description: ModelDescription, answer: Any) -> str | None:
    """Why a smoke answer is wrong, or None when it matches the declared output."""
    declared = description.outputs[0]
    try:
        output = answer["outputs"][0]
    except (KeyError, IndexError, TypeError):
        return f"the smoke inference answered {str(answer)[:200]!r}"
    if output.get("name") != declared.name or output.get("datatype") != declared.datatype:
        return (
            f"the smoke output {output.get('name')}/{output.get('datatype')} is not "
            f"{declared.name}/{declared.datatype}"
        )
    shape = output.get("shape") or []
    if len(shape) != len(declared.shape) or any(
        want not in (-1, got) for want, got in zip(declared.shape, shape, strict=True)
    ):
        return f"the smoke output has shape {shape}; model.json declares {list(declared.shape)}"
    return None


def swap_refusal(serving: ModelDescription, candidate: ModelDescription) -> str | None:
    """Why ``candidate`` cannot replace ``serving`` inside the running servers, judged from
    what their exports record, or None when it may try (the servers then compare the weights'
    names and shapes themselves). Clients see the same model: name, format, class, training
    function (the architecture's identity as the export records it), signature, labels and
    preprocessing; any difference is a full rollout."""
    for field_name, ours, theirs in (
        ("name", serving.name, candidate.name),
        ("format", serving.format, candidate.format),
        ("model_class", serving.model_class, candidate.model_class),
        ("entrypoint", serving.lineage.entrypoint, candidate.lineage.entrypoint),
        ("inputs", serving.inputs, candidate.inputs),
        ("outputs", serving.outputs, candidate.outputs),
        ("labels", serving.labels, candidate.labels),
        ("preprocessing", serving.preprocessing, candidate.preprocessing),
    ):
        if ours != theirs:
            return f"its {field_name} differs from the serving version's"
    return None


def rollback_target(record: DeploymentRecord | None, requested: str | None) -> str | None:
    return requested or (record.previous_version if record else None)


def previous_after(record: DeploymentRecord | None, version: str) -> str | None:
    """The version a rollback returns to once ``version`` is live: the one it replaced, or,
    when the same version is deployed again, whatever it had replaced before. After an
    undeploy nothing is replaced: the version that served last is the one to go back to
    (unless it is the one deployed again)."""
    if record is None:
        return None
    if record.active_version == version:
        return record.previous_version
    if record.active_version is None:
        return None if record.previous_version == version else record.previous_version
    return record.active_version


UNDEPLOYED = "undeployed"
"""A deployment record's status once its model was taken down on request."""


def undeploy_target(record: DeploymentRecord | None) -> str | None:
    """The version an undeploy takes down: the one the record says is active (serving, or
    failed to be served again), or None when there is nothing to take down (no record, or
    undeployed already: a redelivered request changes nothing twice)."""
    if record is None or record.status == UNDEPLOYED:
        return None
    return record.active_version


def undeployed(record: DeploymentRecord, reason: str, now: datetime) -> DeploymentRecord:
    """The record once its model is down: nothing active, no endpoint, no handle, and the
    version that served kept as ``previous_version`` (what to deploy to bring it back)."""
    return record.model_copy(
        update={
            "status": UNDEPLOYED,
            "active_version": None,
            "previous_version": record.active_version or record.previous_version,
            "endpoint": None,
            "handle": None,
            "owner": None,
            "reason": reason[:512],
            "updated": now,
        }
    )


def repeat_endpoint(record: DeploymentRecord | None, version: str, *, serving: bool) -> str | None:
    """The endpoint to answer with when a deploy repeats what is deployed and still serving
    (``serving``: the backend describes the record's handle as running); None when the deploy
    is a rollout."""
    if record is None or record.status != "deployed" or record.active_version != version:
        return None
    return record.endpoint if serving else None


def is_orphaned(record: DeploymentRecord, *, me: str, owner_alive: bool) -> bool:
    """A deployed model whose replica is gone: another replica serves it again (or, on a
    backend whose servers outlive replicas, adopts it)."""
    return record.status == "deployed" and record.owner not in (None, me) and not owner_alive


# --- promotion gates -------------------------------------------------------------------------


@dataclass(frozen=True)
class GateVerdict:
    """Whether a candidate may go live (``refusal`` None) and what was compared: the
    ``detail`` a pipeline's deploy stage keeps (the gate's metric, the candidate's value, the
    serving version and its value when there is one, and why a comparison was waived)."""

    refusal: str | None
    detail: dict[str, JsonValue] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.refusal is None


def judge_gate(
    gate: PromotionGate,
    candidate_version: str,
    candidate_metrics: Mapping[str, float],
    serving_version: str | None,
    serving_metrics: Mapping[str, float] | None,
) -> GateVerdict:
    """Whether ``candidate_version`` passes ``gate``, against what serves now.

    ``serving_version`` is None when nothing serves; ``serving_metrics`` is None when the
    serving version's metrics could not be read. ``min`` and ``max`` bound the candidate's
    value as written; ``better_than_serving`` asks for a strictly better value (higher, or
    lower with ``higher_is_better=False``) and is waived, saying so, when nothing serves, the
    serving version does not report the metric (or its metrics are unknown), or the candidate
    is the serving version itself (a redelivered deploy). Every failed condition is named.
    """
    metric = gate.metric
    detail: dict[str, JsonValue] = {"gate_metric": metric}
    if serving_version is not None:
        detail["serving_version"] = serving_version
    served = None if serving_metrics is None else serving_metrics.get(metric)
    if served is not None and math.isfinite(served):
        detail["serving_value"] = served
    value = candidate_metrics.get(metric)
    if value is None:
        reported = ", ".join(sorted(candidate_metrics)) or "none"
        return _refused(
            detail,
            f"the model does not report metric {metric!r} (it reports: {reported}); "
            "the rollout is refused",
        )
    if not math.isfinite(value):
        return _refused(detail, f"{metric} is {value!r}, not a value a gate can compare")
    detail["candidate_value"] = value
    problems = []
    if gate.min is not None and value < gate.min:
        problems.append(f"{metric} {value!r} is below the gate's min {gate.min!r}")
    if gate.max is not None and value > gate.max:
        problems.append(f"{metric} {value!r} is above the gate's max {gate.max!r}")
    if gate.better_than_serving:
        waived = _waiver(metric, candidate_version, serving_version, serving_metrics, served)
        if waived is not None:
            detail["gate_note"] = waived
        elif served is not None and not _better(value, served, gate.higher_is_better):
            lower = "" if gate.higher_is_better else " (lower is better)"
            problems.append(
                f"{metric} {value!r} is not better than {served!r} of the serving version "
                f"{serving_version}{lower}"
            )
    if problems:
        return _refused(detail, "; ".join(problems))
    return GateVerdict(None, {"gate": "passed", **detail})


def _waiver(
    metric: str,
    candidate_version: str,
    serving_version: str | None,
    serving_metrics: Mapping[str, float] | None,
    served: float | None,
) -> str | None:
    """Why better_than_serving has nothing to compare with, or None when it has."""
    if serving_version is None:
        return "nothing serves yet: better_than_serving passes"
    if serving_version == candidate_version:
        return f"{candidate_version} is the serving version: better_than_serving passes"
    if serving_metrics is None:
        return (
            f"the metrics of the serving version {serving_version} could not be read: "
            "better_than_serving passes"
        )
    if served is None:
        return (
            f"the serving version {serving_version} does not report {metric}: "
            "better_than_serving passes"
        )
    if not math.isfinite(served):
        return (
            f"the serving version {serving_version} reports {metric} {served!r}: "
            "better_than_serving passes"
        )
    return None


def _better(value: float, served: float, higher_is_better: bool) -> bool:
    """Strictly better: equal is not."""
    return value > served if higher_is_better else value < served


def _refused(detail: dict[str, JsonValue], reason: str) -> GateVerdict:
    return GateVerdict(reason, {"gate": "refused", **detail})
