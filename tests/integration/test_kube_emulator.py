"""The emulated API server behaves as a real one where the backends could tell the difference:
invalid names and labels are a 422 the client reports, a foreground delete keeps the owner
(marked) until its dependents are gone, and watches that allow bookmarks get them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.kube.emulator import FOREGROUND, KubeEmulator, running_emulator
from torchrelay.shared.cluster.kubernetes.api import KubeApi, Refused, connect
from torchrelay.shared.cluster.kubernetes.options import KubeOptions
from torchrelay.shared.testing import assert_eventually

NS = "torchrelay"


@pytest.fixture
async def emulator() -> AsyncIterator[KubeEmulator]:
    async with running_emulator() as running:
        yield running


@pytest.fixture
async def api(emulator: KubeEmulator) -> AsyncIterator[KubeApi]:
    api = await connect(KubeOptions(api_url=emulator.url, namespace=NS))
    yield api
    await api.client.close()


def job(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels or {"app": "t"}},
        "spec": {
            "completions": 1,
            "template": {"metadata": {"labels": {"app": "t"}}, "spec": {"containers": []}},
        },
    }


def owned_by(owner: dict[str, Any], kind: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {"app": "t"},
            "ownerReferences": [
                {
                    "apiVersion": owner["apiVersion"],
                    "kind": owner["kind"],
                    "name": owner["metadata"]["name"],
                    "uid": owner["metadata"]["uid"],
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {},
    }


async def test_a_service_named_with_a_leading_digit_is_refused_and_not_created(
    api: KubeApi, emulator: KubeEmulator
) -> None:
    service = {"metadata": {"name": "1run-abc"}, "spec": {"clusterIP": "None"}}
    with pytest.raises(Refused, match=r'found the object invalid.*Service "1run-abc" is invalid: '
                       r'metadata.name: Invalid value: "1run-abc": a DNS-1035 label'):  # fmt: skip
        await api.create("Service", service)
    assert emulator.list("services") == []


async def test_a_job_with_an_invalid_label_value_is_refused_naming_the_field(
    api: KubeApi, emulator: KubeEmulator
) -> None:
    with pytest.raises(Refused, match=r"metadata.labels\[torchrelay.io/run\]"):
        await api.create("Job", job("train-1", {"torchrelay.io/run": "pipe 1"}))
    assert emulator.list("jobs") == []
    created = await api.create("Job", job("train-1", {"torchrelay.io/run": "pipe-1"}))
    assert created["metadata"]["name"] == "train-1"


async def test_a_replace_with_an_invalid_label_is_refused_and_changes_nothing(
    api: KubeApi, emulator: KubeEmulator
) -> None:
    created = await api.create("Job", job("train-1"))
    body = {**created, "metadata": {**created["metadata"], "labels": {"v": "x" * 64}}}
    with pytest.raises(Refused, match="must be no more than 63 characters"):
        await api.replace("Job", "train-1", body)
    assert emulator.get("jobs", "train-1", NS)["metadata"]["labels"] == {"app": "t"}  # type: ignore[index]


async def test_a_foreground_delete_keeps_the_owner_marked_until_its_dependents_are_gone(
    api: KubeApi, emulator: KubeEmulator
) -> None:
    emulator.graceful_pods = True  # as with a kubelet: pods go once their containers stopped
    owner = await api.create("Job", job("train-1"))
    emulator.put("pods", owned_by(owner, "Pod", "train-1-0-abcde"))
    emulator.put("services", owned_by(owner, "Service", "train-1"))

    await api.delete("Job", "train-1")

    marked = await api.get("Job", "train-1")
    assert marked is not None
    assert "deletionTimestamp" in marked["metadata"]
    assert marked["metadata"]["finalizers"] == [FOREGROUND]
    await assert_eventually(lambda: emulator.get("services", "train-1", NS) is None)
    assert emulator.deleting("pods", "train-1-0-abcde", NS)
    assert emulator.get("jobs", "train-1", NS) is not None  # a pod still stops

    emulator.remove("pods", "train-1-0-abcde", NS)  # the kubelet: its containers stopped
    await assert_eventually(lambda: emulator.get("jobs", "train-1", NS) is None)
    assert await api.get("Job", "train-1") is None


async def test_a_foreground_delete_goes_down_the_ownership_chain(
    api: KubeApi, emulator: KubeEmulator
) -> None:
    deployment = emulator.put(
        "deployments",
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "model-x"}},
    )
    replica_set = emulator.put("replicasets", owned_by(deployment, "ReplicaSet", "model-x-1"))
    emulator.put("pods", owned_by(replica_set, "Pod", "model-x-1-abcde"))

    await api.delete("Deployment", "model-x")
    await assert_eventually(lambda: emulator.get("deployments", "model-x", NS) is None)

    assert emulator.list("replicasets") == []
    assert emulator.list("pods") == []
    order = [c.plural for c in emulator.history if c.type == "DELETED"]
    assert order == ["pods", "replicasets", "deployments"]


async def test_deleting_an_object_already_gone_is_fine(api: KubeApi) -> None:
    await api.delete("Job", "never-there")


async def test_a_watch_that_allows_bookmarks_gets_one_on_request_and_before_it_ends(
    api: KubeApi, emulator: KubeEmulator
) -> None:
    _, version = await api.list("Job", "app=t")
    events: list[dict[str, Any]] = []

    async def follow() -> None:
        async for event in api.watch("Job", "app=t", version, timeout_s=2):
            events.append(event)
            if len(events) == 1:  # the job below: ask for a bookmark now
                emulator.bookmark()

    watching = asyncio.create_task(follow())
    await assert_eventually(lambda: bool(emulator._watchers))
    await api.create("Job", job("train-1"))
    await watching

    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK", "BOOKMARK"]
    last = events[-1]["object"]
    assert last["kind"] == "Job"
    assert last["metadata"]["resourceVersion"] == str(emulator._version)


async def test_a_watch_that_does_not_allow_bookmarks_gets_none(emulator: KubeEmulator) -> None:
    emulator.put("jobs", job("train-1"))
    url = f"{emulator.url}/apis/batch/v1/namespaces/{NS}/jobs"
    query = {"watch": "true", "resourceVersion": "0", "timeoutSeconds": "1"}
    async with aiohttp.ClientSession() as session, session.get(url, params=query) as response:
        lines = [line async for line in response.content if line.strip()]
    assert len(lines) == 1
    assert b'"ADDED"' in lines[0]
