"""Pure rules of serve: deployment records, the smoke input, and what a rollback returns to."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

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


def rollback_target(record: DeploymentRecord | None, requested: str | None) -> str | None:
    return requested or (record.previous_version if record else None)


def previous_after(record: DeploymentRecord | None, version: str) -> str | None:
    """The version a rollback returns to once ``version`` is live: the one it replaced, or,
    when the same version is deployed again, whatever it had replaced before."""
    if record is None:
        return None
    if record.active_version == version:
        return record.previous_version
    return record.active_version


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
