"""The Kubernetes training backend: an attempt is an Indexed Job plus its headless Service.

``schedule`` creates both (a second create of the same attempt is success); ``wait`` mirrors
the attempt's Job and pods (list + watch, resuming and relisting as needed) until
:func:`attempt_outcome` says how it ended, or its ranks have not all started within
``pending_timeout_s`` (:func:`pending_failure` says why, from the pods and the namespace's
events); ``cancel`` deletes the Job, and with it its pods and Service (owner references). Any
failed rank fails the attempt: the Job has no retries of its own, restarts are the monitor's,
from the run's last checkpoint. Before a failed attempt's Job is deleted, the log tail of the
rank that failed first is read: it goes into the failure, since the deletion takes it along.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from torchrelay.shared.cluster.kubernetes.api import KubeApi, Mirror, connect
from torchrelay.shared.cluster.kubernetes.manifests import (
    GPU,
    attempt_selector,
    rendezvous_service,
    training_job,
)
from torchrelay.shared.cluster.kubernetes.options import KubeOptions
from torchrelay.shared.cluster.kubernetes.outcome import (
    attempt_outcome,
    first_failed,
    pending_failure,
    pending_s,
)
from torchrelay.shared.cluster.port import Description, Ended, Phase, Status, WorkerJob
from torchrelay.shared.cluster.registry import TrainingConfig
from torchrelay.shared.errors import AlreadyExists, PermanentError, TransientError

log = structlog.get_logger("torchrelay.cluster.kubernetes")
Object = dict[str, Any]
TICK_S = 5.0
"""How often a quiet attempt is looked at again (a pending attempt's time runs out)."""
WORKER_CONTAINER = "worker"


@dataclass(frozen=True)
class KubeRequest:
    """What ``schedule`` sends: the Job, and the selector of its pods."""

    run_id: str
    attempt: int
    job: Object
    selector: str

    @property
    def handle(self) -> str:
        return str(self.job["metadata"]["name"])


class KubernetesBackend:
    name = "kubernetes"

    def __init__(self, api: KubeApi, options: KubeOptions) -> None:
        self.api = api
        self.options = options
        self._requests: dict[str, KubeRequest] = {}
        self._cancelled: set[str] = set()

    def check(self, job: WorkerJob) -> None:
        """Nothing to check up front: the cluster decides. Ranks that do not all start (no node
        takes a pod, its image does not pull, ...) fail the attempt after
        ``pending_timeout_s``, naming the pods and why."""

    def dryrun(self, job: WorkerJob) -> KubeRequest:
        manifest = training_job(job, self.options)
        selector = attempt_selector(job.run_id, job.attempt)
        return KubeRequest(job.run_id, job.attempt, manifest, selector)

    async def schedule(self, request: KubeRequest) -> str:
        try:
            created = await self.api.create("Job", request.job)
        except AlreadyExists:
            created = await self._same_attempt(request)
        service = rendezvous_service(request.job, created["metadata"]["uid"])
        with contextlib.suppress(AlreadyExists):  # created by an earlier try of this schedule
            await self.api.create("Service", service)
        self._requests[request.handle] = request
        container = request.job["spec"]["template"]["spec"]["containers"][0]
        log.info(
            "job.created",
            job=request.handle,
            namespace=self.api.namespace,
            world_size=request.job["spec"]["completions"],
            gpus=container["resources"]["limits"].get(GPU, 0),
        )
        return request.handle

    async def adopt(self, request: KubeRequest) -> str | None:
        """Watch an attempt another replica started, if its Job is still there."""
        if await self.api.get("Job", request.handle) is None:
            return None
        self._requests[request.handle] = request
        return request.handle

    async def _same_attempt(self, request: KubeRequest) -> Object:
        """A 409: fine when the Job there is this attempt (a retried schedule)."""
        existing = await self.api.get("Job", request.handle)
        labels = (existing or {}).get("metadata", {}).get("labels") or {}
        wanted = request.job["metadata"]["labels"]
        if existing is None or any(labels.get(k) != v for k, v in wanted.items()):
            raise PermanentError(
                f"a different job named {request.handle} exists in {self.api.namespace}"
            )
        return existing

    async def describe(self, handle: str) -> Description | None:
        """The Job's phase from its status (any replica may ask); None once it is gone."""
        job = await self.api.get("Job", handle)
        if job is None:
            return None
        status = job.get("status") or {}
        conditions = {
            c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"
        }
        counts = (
            f"{status.get('active', 0)} active, {status.get('succeeded', 0)} succeeded, "
            f"{status.get('failed', 0)} failed of {job['spec'].get('completions', 1)}"
        )
        if "Complete" in conditions:
            return Description(handle, Phase.SUCCEEDED, counts)
        if "Failed" in conditions:
            reason = conditions["Failed"].get("message") or conditions["Failed"].get("reason")
            return Description(handle, Phase.FAILED, f"{counts}: {reason}")
        if status.get("failed"):
            return Description(handle, Phase.FAILED, counts)
        ready = status.get("ready")
        if status.get("active") and (ready is None or ready > 0):
            return Description(handle, Phase.RUNNING, counts)
        return Description(handle, Phase.PENDING, counts)

    async def wait(self, handle: str) -> Ended:
        request = self._requests[handle]
        jobs = Mirror(self.api, "Job", request.selector, timeout_s=self.options.watch_timeout_s)
        pods = Mirror(self.api, "Pod", request.selector, timeout_s=self.options.watch_timeout_s)
        changed = asyncio.Event()

        async def pump(mirror: Mirror) -> None:
            async for _ in mirror.follow():
                changed.set()

        pumps = [
            asyncio.create_task(pump(m), name=f"mirror:{m.kind}:{handle}") for m in (jobs, pods)
        ]
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TICK_S):
                        await changed.wait()
                changed.clear()
                for task in pumps:
                    if task.done():
                        task.result()  # a mirror that failed for good (403) ends the wait
                job = jobs.objects.get(handle)
                if job is None and jobs.relists:  # it existed when the wait began
                    if handle in self._cancelled:
                        return Ended(Status.CANCELLED, "cancelled")
                    return Ended(Status.FAILED, f"job {handle} was deleted")
                current = list(pods.objects.values())
                ended = attempt_outcome(job, current)
                if ended is None and pods.relists:  # pending: judged once the pods are listed
                    ended = await self._pending(job, current)
                if ended is not None:
                    if handle in self._cancelled:
                        return Ended(Status.CANCELLED, "cancelled")
                    if ended.status is Status.FAILED:
                        ended = await self._with_log_tail(ended, current)
                        await self.api.delete("Job", handle)  # stop the other ranks now
                    return ended
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._requests.pop(handle, None)
            self._cancelled.discard(handle)

    async def _pending(self, job: Object | None, pods: list[Object]) -> Ended | None:
        """The failure of an attempt whose ranks did not all start in time, with why (the
        namespace's events are read only then)."""
        waited = pending_s(job, pods, datetime.now(UTC))
        if job is None or waited is None or waited < self.options.pending_timeout_s:
            return None
        try:
            events, _ = await self.api.list("Event", "")
        except (TransientError, PermanentError) as exc:  # the pods still say most of why
            log.warning("job.events_unread", job=job["metadata"]["name"], error=str(exc))
            events = []
        return pending_failure(job, pods, events, waited_s=waited)

    async def _with_log_tail(self, ended: Ended, pods: list[Object]) -> Ended:
        """``ended`` with the last lines of the first failed pod's log, read before its Job is
        deleted (the pod and its log go with it); as it was when there is none to read."""
        failed = first_failed(pods)
        if failed is None:
            return ended
        name = failed["metadata"]["name"]
        try:
            lines = await self.api.log_tail(
                name, self.options.log_tail_lines, container=WORKER_CONTAINER
            )
        except (TransientError, PermanentError) as exc:  # the failure matters more than its log
            log.warning("pod.log_unread", pod=name, error=str(exc))
            return ended
        return dataclasses.replace(ended, log_tail=lines) if lines else ended

    async def cancel(self, handle: str) -> None:
        """Delete the Job (any replica may: it belongs to the cluster, not to the replica that
        created it); one already gone (404) is success."""
        if handle in self._requests:  # waited for here: that wait ends as cancelled
            self._cancelled.add(handle)
        await self.api.delete("Job", handle)

    async def aclose(self) -> None:
        """Jobs outlive this replica on purpose (another one can watch them); only the
        connection closes."""
        await self.api.client.close()


async def open_training(config: TrainingConfig) -> KubernetesBackend:
    return KubernetesBackend(await connect(config.kube), config.kube)
