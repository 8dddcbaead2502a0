"""Serve's pure rules: when a deploy is a repeat, when a model is orphaned, and records written
before serving backends had handles."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from torchrelay.services.serve.domain import DeploymentRecord, is_orphaned, repeat_endpoint

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
