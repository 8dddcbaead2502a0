"""How a training attempt stands, read from its Job, pods and events (pure; the backend feeds
it what it watches).

An attempt fails when a rank fails, naming the FIRST rank to fail (by the time its container
terminated: the others usually only lost their peer), its reason and exit code, or at once
when an image name is invalid. Until every rank has started it is *pending*: pulling images,
waiting for a node, mounting volumes, or not even created (quota, an admission webhook). A
pending attempt is failed only after the pending timeout, and then says why, from the pods'
states and the events about them and the Job. A pull that fails once is retried by the kubelet
and is no failure; one still failing at the timeout is.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
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
"""Waiting reasons of a container that is not starting (what ``pod_problems`` reports)."""
NEVER_STARTS = frozenset({"InvalidImageName"})
"""Waiting reasons that no retry can fix: the attempt fails at once."""
IMAGE_PULL = frozenset({"ErrImagePull", "ImagePullBackOff"})
MOUNT_EVENTS = frozenset({"FailedMount", "FailedAttachVolume"})
CREATE_EVENTS = frozenset({"FailedCreate"})
PENDING_SETTING = "TORCHRELAY_KUBE_PENDING_TIMEOUT_S"


def _rank(pod: Object) -> int | None:
    metadata = pod.get("metadata", {})
    for source in (metadata.get("labels") or {}, metadata.get("annotations") or {}):
        if INDEX_LABEL in source:
            return int(source[INDEX_LABEL])
    return None


def _name(obj: Object) -> str:
    return str(obj.get("metadata", {}).get("name", "?"))


def _who(pod: Object) -> str:
    rank = _rank(pod)
    return f"pod {_name(pod)}" + ("" if rank is None else f" (rank {rank})")


def _states(pod: Object) -> list[Object]:
    status = pod.get("status") or {}
    containers = list(status.get("initContainerStatuses") or [])
    return containers + list(status.get("containerStatuses") or [])


def _time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _failed_at(pod: Object) -> datetime | None:
    """When the pod's first container terminated with an error (None: unknown, e.g. evicted)."""
    times = [
        when
        for container in _states(pod)
        if (terminated := (container.get("state") or {}).get("terminated"))
        and terminated.get("exitCode", 0) != 0
        and (when := _time(terminated.get("finishedAt"))) is not None
    ]
    return min(times, default=None)


def first_failed(pods: Sequence[Object]) -> Object | None:
    """The pod that failed first: by the time its container terminated, then by rank (a pod
    with no time, e.g. an evicted one, after those with one)."""
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]

    def order(pod: Object) -> tuple[bool, str, bool, int]:
        when = _failed_at(pod)
        rank = _rank(pod)
        return when is None, when.isoformat() if when else "", rank is None, rank or 0

    return min(failed, key=order, default=None)


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


def _waiting(pod: Object, reasons: frozenset[str]) -> Object | None:
    for container in _states(pod):
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in reasons:
            return dict(waiting)
    return None


def _cannot_start(pod: Object, reasons: frozenset[str] = CANNOT_START) -> Ended | None:
    waiting = _waiting(pod, reasons)
    if waiting is None:
        return None
    message = waiting.get("message")
    text = f"{_who(pod)} cannot start: {waiting['reason']}" + (f": {message}" if message else "")
    return Ended(Status.FAILED, text, _rank(pod))


def attempt_outcome(job: Object | None, pods: Sequence[Object]) -> Ended | None:
    """The attempt's end, or None while it is still on its way (pending or running)."""
    failed = first_failed(pods)
    if failed is not None:
        return _failed(failed)
    for pod in sorted(pods, key=lambda p: (_rank(p) is None, _rank(p) or 0)):
        never = _cannot_start(pod, NEVER_STARTS)
        if never is not None:
            return never
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


# --- pending ---------------------------------------------------------------------------------


def _started(pod: Object) -> bool:
    """Whether the pod's containers run (or ran): the rank is past scheduling, pulling and
    mounting."""
    if (pod.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed"):
        return True
    states = _states(pod)
    return bool(states) and all(
        (c.get("state") or {}).get("running") or (c.get("state") or {}).get("terminated")
        for c in states
    )


def pending_s(job: Object | None, pods: Sequence[Object], now: datetime) -> float | None:
    """How long the attempt has waited for its ranks to start: from the Job's start (its
    ``startTime``, set when a queue admits it) or creation, until a pod of every completion
    index runs. None once every rank has started, and while the Job is suspended (a queue
    such as Kueue holds it: waiting there is the queue's policy, not a stuck start)."""
    if job is None or (job.get("spec") or {}).get("suspend"):
        return None
    completions = int((job.get("spec") or {}).get("completions", 1))
    started = {_rank(pod) for pod in pods if _started(pod)}
    if len(started - {None}) >= completions:
        return None
    since = _time((job.get("status") or {}).get("startTime")) or _time(
        job.get("metadata", {}).get("creationTimestamp")
    )
    return max(0.0, (now - since).total_seconds()) if since else 0.0


def _about(events: Sequence[Object], obj: Object, reasons: frozenset[str]) -> Object | None:
    """The newest event about ``obj`` (by uid where both have one, else by name) with one of
    ``reasons``."""
    metadata = obj.get("metadata", {})
    found = None
    for event in events:
        involved = event.get("involvedObject") or {}
        if event.get("reason") not in reasons or involved.get("name") != metadata.get("name"):
            continue
        if involved.get("uid") and metadata.get("uid") and involved["uid"] != metadata["uid"]:
            continue
        found = event  # listed oldest first
    return found


def _why_pending(pod: Object, events: Sequence[Object]) -> tuple[int, str]:
    """Why one pod has not started, as the scheduler, the kubelet and the events say, and how
    telling that is (0: a cause; 1: still creating; 2: nothing known)."""
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            why = condition.get("reason") or "not scheduled"
            return 0, f"is {why}: {condition.get('message') or 'no node fits'}"
    pulling = _waiting(pod, IMAGE_PULL)
    if pulling is not None:
        text = f"cannot pull its image: {pulling['reason']}"
        return 0, text + (f": {pulling['message']}" if pulling.get("message") else "")
    mount = _about(events, pod, MOUNT_EVENTS)
    if mount is not None:
        return 0, f"cannot mount its volumes: {mount['reason']}: {mount.get('message', '')}"
    other = _waiting(pod, CANNOT_START)
    if other is not None:
        text = f"cannot start: {other['reason']}"
        return 0, text + (f": {other['message']}" if other.get("message") else "")
    creating = _waiting(pod, frozenset({"ContainerCreating", "PodInitializing"}))
    if creating is not None:
        return 1, f"is still {creating['reason']}"
    return 2, "is Pending"


def pending_failure(
    job: Object, pods: Sequence[Object], events: Sequence[Object], *, waited_s: float
) -> Ended:
    """The failure of an attempt whose ranks did not all start within the pending timeout,
    saying why: each reason once, with the first pod that has it (and how many more do), and
    the Job's own events when it could not create every pod (quota, admission webhooks). The
    rank it names is the first pod's with a cause (not merely still creating or pending)."""
    completions = int((job.get("spec") or {}).get("completions", 1))
    problems: dict[tuple[int, str], list[Object]] = {}
    for pod in sorted(pods, key=lambda p: (_rank(p) is None, _rank(p) or 0)):
        if not _started(pod):
            problems.setdefault(_why_pending(pod, events), []).append(pod)
    problems = dict(sorted(problems.items(), key=lambda item: item[0][0]))  # causes first
    parts = []
    missing = completions - len({_rank(pod) for pod in pods} - {None})
    if missing > 0:
        refused = _about(events, job, CREATE_EVENTS)
        text = f"job {_name(job)} has {missing} of {completions} pods not created"
        if refused is not None:
            text += f": {refused['reason']}: {refused.get('message', '')}".rstrip(": ")
        parts.append(text)
    for (_, why), stuck in problems.items():
        more = f" and {len(stuck) - 1} more" if len(stuck) > 1 else ""
        parts.append(f"{_who(stuck[0])}{more} {why}")
    first = next(iter(problems.values()), [None])[0]
    reason = f"the ranks did not all start within {waited_s:.0f}s ({PENDING_SETTING}): " + (
        "; ".join(parts) or "no pod is running"
    )
    return Ended(Status.FAILED, reason, _rank(first) if first is not None else None)


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
