"""How an attempt or a rollout stands, read from Kubernetes objects (pure)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from torchrelay.shared.cluster.kubernetes.manifests import (
    job_name,
    model_object_name,
    version_label,
)
from torchrelay.shared.cluster.kubernetes.outcome import (
    attempt_outcome,
    pod_problems,
    rollout_state,
)
from torchrelay.shared.cluster.port import Status

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
INDEX = "batch.kubernetes.io/job-completion-index"


def pod(name: str, rank: int, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {INDEX: str(rank)}}, "status": status}


def job(completions: int = 2, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "j"}, "spec": {"completions": completions}, "status": status}


def outcome(job_obj: dict[str, Any] | None, pods: list[dict[str, Any]]) -> Any:
    return attempt_outcome(job_obj, pods, now=NOW, unschedulable_after_s=60)


def test_running_pods_are_no_outcome_yet() -> None:
    assert outcome(job(), [pod("a", 0, phase="Running"), pod("b", 1, phase="Running")]) is None


def test_the_lowest_failed_rank_is_named() -> None:
    ended = outcome(
        job(),
        [
            pod("b", 1, phase="Failed"),
            pod("a", 0, phase="Failed", reason="Evicted", message="node low on memory"),
        ],
    )
    assert ended.status is Status.FAILED
    assert ended.reason == "pod a (rank 0) failed: Evicted: node low on memory"


def test_an_unschedulable_pod_fails_only_after_the_timeout() -> None:
    def waiting_since(when: str) -> dict[str, Any]:
        condition = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "lastTransitionTime": when,
            "message": "0/2 nodes: Insufficient cpu",
        }
        return pod("a", 0, phase="Pending", conditions=[condition])  # fmt: skip

    assert outcome(job(), [waiting_since("2026-11-28T11:59:30+00:00")]) is None
    ended = outcome(job(), [waiting_since("2026-11-28T11:58:00+00:00")])
    assert ended.reason == "pod a (rank 0) is Unschedulable for 120s: 0/2 nodes: Insufficient cpu"


def test_the_job_controller_decides_success_and_deadlines() -> None:
    assert outcome(job(succeeded=2), []).status is Status.SUCCEEDED
    assert outcome(job(succeeded=1), []) is None
    deadline = {
        "type": "Failed",
        "status": "True",
        "reason": "DeadlineExceeded",
        "message": "Job was active longer than specified deadline",
    }
    failed = job(conditions=[deadline])
    ended = outcome(failed, [])
    assert (
        ended.reason
        == "job j failed: DeadlineExceeded: Job was active longer than specified deadline"
    )


def deployment(**status: Any) -> dict[str, Any]:
    return {"spec": {"replicas": 2}, "metadata": {"generation": 3}, "status": status}


PROGRESS_DEADLINE = [{"type": "Progressing", "reason": "ProgressDeadlineExceeded"}]


@pytest.mark.parametrize(
    ("status", "state"),
    [
        (deployment(observedGeneration=2), "waiting"),
        (deployment(observedGeneration=3, updatedReplicas=1, replicas=3), "waiting"),
        (deployment(observedGeneration=3, updatedReplicas=2, replicas=3), "waiting"),
        (
            deployment(observedGeneration=3, updatedReplicas=2, replicas=2, availableReplicas=1),
            "waiting",
        ),
        (
            deployment(observedGeneration=3, updatedReplicas=2, replicas=2, availableReplicas=2),
            "done",
        ),
        (deployment(observedGeneration=3, conditions=PROGRESS_DEADLINE), "failed"),
    ],
)
def test_a_rollout_is_done_when_every_wanted_replica_is_new_and_available(
    status: dict[str, Any], state: str
) -> None:
    assert rollout_state(status)[0] == state


def test_pods_that_do_not_serve_say_why() -> None:
    crashing = pod(
        "m1",
        0,
        phase="Running",
        containerStatuses=[
            {"name": "server", "ready": False, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}
        ],
    )
    unready = pod(
        "m2",
        0,
        phase="Running",
        containerStatuses=[{"name": "server", "ready": False, "restartCount": 0}],
    )
    ready = pod("m3", 0, phase="Running", containerStatuses=[{"name": "server", "ready": True}])
    assert pod_problems([crashing, unready, ready]) == [
        "pod m1 (rank 0) is waiting: CrashLoopBackOff",
        "pod m2 (rank 0) is not ready (restarts: 0)",
    ]


def test_names_stay_dns_labels() -> None:
    long_run = "a-pipeline-with-a-rather-long-name-0123456789abcdef.train:retry"
    for attempt in (0, 12):
        name = job_name(long_run, attempt)
        assert len(f"{name}-1023") <= 63
        assert name == name.lower()
        assert all(c.isalnum() or c == "-" for c in name)
    assert job_name("r", 0) != job_name("R", 0), "a hash keeps distinct run ids apart"
    assert len(model_object_name("m" * 63)) <= 63
    assert len(version_label("v" * 64)) <= 63
