"""Serve's pure rules: when a deploy is a repeat, when a model is orphaned, records written
before serving backends had handles, and when a new version may be swapped in place."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from torchrelay.services.serve.domain import (
    DeploymentRecord,
    is_orphaned,
    previous_after,
    repeat_endpoint,
    rollback_target,
    swap_refusal,
    undeploy_target,
    undeployed,
)
from torchrelay.shared.events.data import DatasetRef
from torchrelay.shared.storage import ModelDescription, ModelLineage, TensorSignature

ENDPOINT = "http://127.0.0.1:9000/v2/models/digits"


def deployed(
    version: str = "v1", owner: str | None = "serve-a", **changes: object
) -> DeploymentRecord:
    record = DeploymentRecord(
        model="digits",
        active_version=version,
        endpoint=ENDPOINT,
        status="deployed",
        owner=owner,
        handle="local:0123456789ab:9000:2",
        updated=datetime.now(UTC),
    )
    return record.model_copy(update=changes)


def test_deploying_what_serves_is_a_repeat_with_the_same_endpoint() -> None:
    assert repeat_endpoint(deployed(), "v1", serving=True) == ENDPOINT


def test_a_version_that_no_longer_serves_is_rolled_out_again() -> None:
    # Its servers died (a replica killed, a crash): the same version is a rollout, not a repeat.
    assert repeat_endpoint(deployed(), "v1", serving=False) is None


def test_another_version_or_a_failed_record_or_none_is_a_rollout() -> None:
    assert repeat_endpoint(deployed(), "v2", serving=True) is None
    assert repeat_endpoint(deployed(status="failed"), "v1", serving=True) is None
    assert repeat_endpoint(None, "v1", serving=True) is None


def test_a_deployed_model_whose_owner_is_gone_is_orphaned() -> None:
    assert is_orphaned(deployed(owner="serve-a"), me="serve-b", owner_alive=False)


def test_a_live_owner_a_failed_record_or_my_own_model_is_not() -> None:
    assert not is_orphaned(deployed(owner="serve-a"), me="serve-b", owner_alive=True)
    assert not is_orphaned(deployed(status="failed"), me="serve-b", owner_alive=False)
    assert not is_orphaned(deployed(owner="serve-b"), me="serve-b", owner_alive=False)
    assert not is_orphaned(deployed(owner=None), me="serve-b", owner_alive=False)


def test_a_record_from_before_handles_still_reads_without_its_local_details() -> None:
    old = {
        "model": "digits",
        "active_version": "v1",
        "endpoint": ENDPOINT,
        "status": "deployed",
        "owner": "serve-a",
        "port": 9000,
        "servers": ["/x/_admin/a.sock"],
        "updated": "2026-11-30T10:00:00Z",
    }
    record = DeploymentRecord.model_validate_json(json.dumps(old))
    assert (record.active_version, record.handle, record.endpoint) == ("v1", None, ENDPOINT)


# --- undeploy --------------------------------------------------------------------------------


def test_an_undeploy_takes_down_the_active_version_of_a_deployed_or_failed_model() -> None:
    assert undeploy_target(deployed("v2")) == "v2"
    # A model whose servers could not be served again still holds its version: take it down.
    assert undeploy_target(deployed("v2", status="failed")) == "v2"


def test_an_undeploy_of_a_model_not_deployed_or_already_undeployed_has_no_target() -> None:
    assert undeploy_target(None) is None
    down = undeployed(deployed("v2"), "retired", datetime.now(UTC))
    assert undeploy_target(down) is None, "a redelivered request changes nothing twice"


def test_an_undeployed_record_serves_nothing_and_remembers_what_served() -> None:
    now = datetime.now(UTC)
    down = undeployed(deployed("v2", previous_version="v1"), "x" * 600, now)
    assert (down.status, down.active_version, down.endpoint, down.handle, down.owner) == (
        "undeployed",
        None,
        None,
        None,
        None,
    )
    assert down.previous_version == "v2", "what to deploy to bring it back"
    assert down.reason == "x" * 512
    assert down.updated == now
    assert repeat_endpoint(down, "v2", serving=True) is None, "deploying it again is a rollout"
    assert not is_orphaned(down, me="serve-b", owner_alive=False), "nobody serves it again"


def test_a_deploy_after_an_undeploy_can_be_rolled_back_to_what_served_last() -> None:
    down = undeployed(deployed("v2", previous_version="v1"), "retired", datetime.now(UTC))
    assert previous_after(down, "v3") == "v2"
    assert previous_after(down, "v2") is None, "the same version back replaces nothing"
    assert rollback_target(down, None) == "v2"


def described(version: str, **changes: object) -> ModelDescription:
    description = ModelDescription(
        name="digits",
        version=version,
        format="torchscript",
        inputs=(TensorSignature(name="input", datatype="FP32", shape=(-1, 1, 8, 8)),),
        outputs=(TensorSignature(name="output", datatype="FP32", shape=(-1, 10)),),
        metrics={"accuracy": 0.9},
        lineage=ModelLineage(
            dataset=DatasetRef(name="digits", version="d1"),
            run_id=f"run-{version}",
            attempt=0,
            entrypoint="examples.digits:train",
            steps=10,
        ),
        created=datetime.now(UTC),
    )
    return description.model_copy(update=changes)


def test_a_retrained_version_of_the_same_model_may_swap_in_place() -> None:
    assert swap_refusal(described("v1"), described("v2", metrics={"accuracy": 0.95})) is None


def test_a_changed_signature_class_or_training_function_is_a_full_rollout() -> None:
    five = (TensorSignature(name="output", datatype="FP32", shape=(-1, 5)),)
    lineage = described("v1").lineage.model_copy(update={"entrypoint": "other:train"})
    cases = {
        "outputs": described("v2", outputs=five),
        "entrypoint": described("v2", lineage=lineage),
        "format": described("v2", format="state_dict", model_class="examples.digits:Net"),
        "labels": described("v2", labels=tuple(str(i) for i in range(10))),
    }
    for field_name, candidate in cases.items():
        assert swap_refusal(described("v1"), candidate) == (
            f"its {field_name} differs from the serving version's"
        )
