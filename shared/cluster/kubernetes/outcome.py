"""How a training attempt stands, read from its Job and pods (pure; the backend feeds it what
it watches). The first failure wins and names the pod, its rank, the reason and exit code."""

from __future__ import annotations

import signal
from datetime import datetime
from typing import Any

from torchrelay.shared.cluster.kubernetes.manifests import INDEX_LABEL
from torchrelay.shared.cluster.port import Ended, Status

Object = dict[str, Any]
CANNOT_START = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)


def _rank(pod: Object) -> int | None:
    metadata = pod.get("metadata", {})
    for source in (metadata.get("labels") or {}, metadata.get("annotations") or {}):
        if INDEX_LABEL in source:
            return int(source[INDEX_LABEL])
    return None


def _who(pod: Object) -> str:
    rank = _rank(pod)
    name = pod.get("metadata", {}).get("name", "?")
    return f"pod {name}" + ("" if rank is None else f" (rank {rank})")


def _states(pod: Object) -> list[Object]:
    status = pod.get("status") or {}
    containers = list(status.get("initContainerStatuses") or [])
    return containers + list(status.get("containerStatuses") or [])


def _failed(pod: Object) -> Ended:
    for container in _states(pod):
        terminated = (container.get("state") or {}).get("terminated")
        if terminated and terminated.get("exitCode", 0) != 0:
            code = int(terminated["exitCode"])
            why = terminated.get("reason") or "Error"
            name = signal.Signals(code - 128).name if 128 < code < 128 + 65 else None
            text = f"{_who(pod)} failed: {why} (exit {code}"
            text += f", {name})" if name else ")"
            return Ended(Status.FAILED, text, _rank(pod), code, name)
    status = pod.get("status") or {}
    why = status.get("reason") or "Failed"  # Evicted, DeadlineExceeded, NodeLost...
    message = status.get("message")
    text = f"{_who(pod)} failed: {why}" + (f": {message}" if message else "")
    return Ended(Status.FAILED, text, _rank(pod))


def _cannot_start(pod: Object) -> Ended | None:
    for container in _states(pod):
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in CANNOT_START:
            message = waiting.get("message")
            text = f"{_who(pod)} cannot start: {waiting['reason']}" + (
                f": {message}" if message else ""
            )
            return Ended(Status.FAILED, text, _rank(pod))
    return None


def _unschedulable(pod: Object, now: datetime, after_s: float) -> Ended | None:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if (
            condition.get("type") == "PodScheduled"
            and condition.get("status") == "False"
            and condition.get("reason") == "Unschedulable"
        ):
            since = condition.get("lastTransitionTime")
            waited = (now - datetime.fromisoformat(since)).total_seconds() if since else 0.0
            if waited >= after_s:
                message = condition.get("message") or "no node fits"
                text = f"{_who(pod)} is Unschedulable for {waited:.0f}s: {message}"
                return Ended(Status.FAILED, text, _rank(pod))
    return None


def attempt_outcome(
    job: Object | None,
    pods: list[Object],
    *,
    now: datetime,
    unschedulable_after_s: float,
) -> Ended | None:
    """The attempt's end, or None while it is still on its way."""
    for pod in sorted(pods, key=lambda p: (_rank(p) is None, _rank(p) or 0)):
        if (pod.get("status") or {}).get("phase") == "Failed":
            return _failed(pod)
    for pod in pods:
        problem = _cannot_start(pod) or _unschedulable(pod, now, unschedulable_after_s)
        if problem is not None:
            return problem
    if job is None:
        return None
    conditions = {
        c.get("type"): c for c in (job.get("status") or {}).get("conditions") or []
        if c.get("status") == "True"
    }  # fmt: skip
    if "Failed" in conditions:
        condition = conditions["Failed"]
        text = f"job {job['metadata']['name']} failed: {condition.get('reason', 'Failed')}"
        if condition.get("message"):
            text += f": {condition['message']}"
        return Ended(Status.FAILED, text)
    completions = (job.get("spec") or {}).get("completions", 1)
    succeeded = (job.get("status") or {}).get("succeeded", 0)
    if "Complete" in conditions or succeeded >= completions:
        return Ended(Status.SUCCEEDED, "every rank finished")
    return None


def rollout_state(deployment: Object) -> tuple[str, str]:
    """("done" | "waiting" | "failed", why): a rollout is done when the controller has seen the
    new template and every wanted replica is updated and available, with no old one left."""
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    wanted = int(spec.get("replicas", 1))
    if int(status.get("observedGeneration", 0)) < int(deployment["metadata"].get("generation", 1)):
        return "waiting", "the new template is not observed yet"
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == (
            "ProgressDeadlineExceeded"
        ):
            return "failed", f"progress deadline exceeded: {condition.get('message', '')}".strip()
    updated = int(status.get("updatedReplicas", 0))
    available = int(status.get("availableReplicas", 0))
    total = int(status.get("replicas", 0))
    if updated < wanted:
        return "waiting", f"{updated} of {wanted} replicas updated"
    if total > updated:
        return "waiting", f"{total - updated} old replicas still running"
    if available < updated:
        return "waiting", f"{available} of {wanted} updated replicas available"
    return "done", f"{wanted} of {wanted} replicas available"


def pod_problems(pods: list[Object]) -> list[str]:
    """Why each of ``pods`` is not serving: it cannot start, failed, or is not ready."""
    problems = []
    for pod in pods:
        status = pod.get("status") or {}
        cannot = _cannot_start(pod)
        if cannot is not None:
            problems.append(cannot.reason)
            continue
        if status.get("phase") == "Failed":
            problems.append(_failed(pod).reason)
            continue
        for container in _states(pod):
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason"):
                problems.append(f"{_who(pod)} is waiting: {waiting['reason']}")
                break
            if not container.get("ready", False):
                restarts = container.get("restartCount", 0)
                problems.append(f"{_who(pod)} is not ready (restarts: {restarts})")
                break
        else:
            if status.get("phase") == "Pending":
                problems.append(f"{_who(pod)} is Pending")
    return problems
