"""How an attempt or a rollout stands, read from Kubernetes objects (pure): the first rank to
fail, what no retry fixes, how long an attempt has been pending and why."""

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
    first_failed,
    pending_failure,
    pending_s,
    pod_problems,
    rollout_state,
)
from torchrelay.shared.cluster.port import Status

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
INDEX = "batch.kubernetes.io/job-completion-index"


def pod(name: str, rank: int, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {INDEX: str(rank)}}, "status": status}


def job(completions: int = 2, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "j", "uid": "job-uid", "creationTimestamp": "2026-11-28T11:30:00Z"},
        "spec": {"completions": completions},
        "status": status,
    }


def outcome(job_obj: dict[str, Any] | None, pods: list[dict[str, Any]]) -> Any:
    return attempt_outcome(job_obj, pods)


def terminated(code: int, reason: str, finished: str | None) -> list[dict[str, Any]]:
    """A container that ended with ``code`` at ``finished`` (a time of day on NOW's date)."""
    state: dict[str, Any] = {"exitCode": code, "reason": reason}
    if finished is not None:
        state["finishedAt"] = f"2026-11-28T{finished}Z"
    return [{"name": "worker", "state": {"terminated": state}}]


def waiting(reason: str, message: str | None = None) -> list[dict[str, Any]]:
    state = {"reason": reason} | ({"message": message} if message else {})
    return [{"name": "worker", "state": {"waiting": state}}]


RUNNING = [{"name": "worker", "state": {"running": {"startedAt": "2026-11-28T11:31:00Z"}}}]


def test_running_pods_are_no_outcome_yet() -> None:
    assert outcome(job(), [pod("a", 0, phase="Running"), pod("b", 1, phase="Running")]) is None


def test_the_first_rank_to_fail_is_named_not_the_lowest() -> None:
    # Rank 1 ran out of memory; rank 0 failed after, when its all-reduce lost its peer.
    echo = pod("a", 0, phase="Failed", containerStatuses=terminated(1, "Error", "11:50:09"))
    cause = pod(
        "b",
        1,
        phase="Failed",
        containerStatuses=terminated(137, "OOMKilled", "11:50:02"),
    )
    ended = outcome(job(), [echo, cause])
    assert ended.status is Status.FAILED
    assert ended.rank == 1
    assert ended.reason == "pod b (rank 1) failed: OOMKilled (exit 137, SIGKILL)"
    assert first_failed([echo, cause]) is cause


def test_a_failed_pod_with_no_time_comes_after_those_with_one_then_by_rank() -> None:
    evicted = pod("a", 0, phase="Failed", reason="Evicted", message="node low on memory")
    later = pod("c", 2, phase="Failed", reason="Evicted")
    timed = pod("b", 1, phase="Failed", containerStatuses=terminated(2, "Error", "11:59:00"))
    assert first_failed([later, evicted, timed]) is timed
    ended = outcome(job(), [later, evicted])
    assert ended.reason == "pod a (rank 0) failed: Evicted: node low on memory"
    assert first_failed([pod("r", 0, phase="Running")]) is None


def test_a_failed_image_pull_is_retried_but_an_invalid_image_name_fails_at_once() -> None:
    pulling = pod("a", 0, phase="Pending", containerStatuses=waiting("ErrImagePull", "timeout"))
    backing_off = pod("b", 1, phase="Pending", containerStatuses=waiting("ImagePullBackOff"))
    assert outcome(job(), [pulling, backing_off]) is None, "the kubelet pulls again"
    invalid = pod("b", 1, phase="Pending", containerStatuses=waiting("InvalidImageName", "bad ref"))
    ended = outcome(job(), [pulling, invalid])
    assert ended.reason == "pod b (rank 1) cannot start: InvalidImageName: bad ref"
    assert ended.rank == 1


def test_an_attempt_is_pending_until_a_pod_of_every_rank_runs() -> None:
    started = pod("a", 0, phase="Running", containerStatuses=RUNNING)
    waiting_one = pod("b", 1, phase="Pending")
    assert pending_s(job(), [started, waiting_one], NOW) == 1800.0, "since the Job's creation"
    admitted = job(startTime="2026-11-28T11:55:00Z")
    assert pending_s(admitted, [started], NOW) == 300.0, "since a queue admitted it"
    done = pod("b", 1, phase="Succeeded")
    assert pending_s(job(), [started, done], NOW) is None
    assert pending_s(job(), [], NOW) == 1800.0, "no pod created is pending too"
    assert pending_s(None, [waiting_one], NOW) is None


def test_a_job_suspended_by_its_queue_is_not_pending() -> None:
    queued = job()
    queued["spec"]["suspend"] = True
    assert pending_s(queued, [], NOW) is None


def event(obj: dict[str, Any], reason: str, message: str, kind: str = "Pod") -> dict[str, Any]:
    metadata = obj["metadata"]
    involved = {"kind": kind, "name": metadata["name"], "uid": metadata.get("uid", "")}
    return {"involvedObject": involved, "reason": reason, "message": message}


def test_a_pending_failure_says_why_each_rank_did_not_start() -> None:
    unschedulable = pod(
        "a", 0, phase="Pending",
        conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}],
    )  # fmt: skip
    pull = pod("b", 1, phase="Pending", containerStatuses=waiting("ImagePullBackOff", "denied"))
    mounting = pod("c", 2, phase="Pending", containerStatuses=waiting("ContainerCreating"))
    mounting["metadata"]["uid"] = "pod-c"
    creating = pod("d", 3, phase="Pending", containerStatuses=waiting("ContainerCreating"))
    events = [
        event(mounting, "FailedMount", 'volume "storage": mount.nfs: Connection timed out'),
        event({"metadata": {"name": "c", "uid": "an-older-pod"}}, "FailedMount", "stale"),
    ]
    ended = pending_failure(
        job(4), [creating, mounting, pull, unschedulable], events, waited_s=1800
    )
    assert ended.status is Status.FAILED
    assert ended.rank == 0
    assert ended.reason == (
        "the ranks did not all start within 1800s (TORCHRELAY_KUBE_PENDING_TIMEOUT_S): "
        "pod a (rank 0) is Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.; "
        "pod b (rank 1) cannot pull its image: ImagePullBackOff: denied; "
        'pod c (rank 2) cannot mount its volumes: FailedMount: volume "storage": mount.nfs: '
        "Connection timed out; "
        "pod d (rank 3) is still ContainerCreating"
    )  # fmt: skip


def test_a_pending_failure_names_the_rank_with_a_cause_and_counts_the_others() -> None:
    pods = [
        pod("a", 0, phase="Pending"),
        pod("b", 1, phase="Pending", containerStatuses=waiting("ErrImagePull", "not found")),
        pod("c", 2, phase="Pending", containerStatuses=waiting("ErrImagePull", "not found")),
    ]
    ended = pending_failure(job(3), pods, [], waited_s=60)
    assert ended.rank == 1
    assert ended.reason.endswith(
        "pod b (rank 1) and 1 more cannot pull its image: ErrImagePull: not found; "
        "pod a (rank 0) is Pending"
    )


def test_pods_the_job_could_not_create_are_explained_by_its_events() -> None:
    quota = (
        'pods "j-1-x" is forbidden: exceeded quota: gpu, requested: nvidia.com/gpu=1, '
        "used: nvidia.com/gpu=8, limited: nvidia.com/gpu=8"
    )
    the_job = job(2)
    events = [event(the_job, "FailedCreate", quota, kind="Job")]
    started = pod("a", 0, phase="Running", containerStatuses=RUNNING)
    ended = pending_failure(the_job, [started], events, waited_s=1800)
    assert ended.reason == (
        "the ranks did not all start within 1800s (TORCHRELAY_KUBE_PENDING_TIMEOUT_S): "
        f"job j has 1 of 2 pods not created: FailedCreate: {quota}"
    )
    assert ended.rank is None
    silent = pending_failure(job(2), [], [], waited_s=1800)
    assert silent.reason.endswith("job j has 2 of 2 pods not created")


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
