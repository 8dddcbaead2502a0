"""The Kubernetes training backend: an attempt is an Indexed Job plus its headless Service.

``schedule`` creates both (a second create of the same attempt is success); ``wait`` mirrors
the attempt's Job and pods (list + watch, resuming and relisting as needed) until
:func:`attempt_outcome` says how it ended; ``cancel`` deletes the Job, and with it its pods
and Service (owner references). Any failed rank fails the attempt: the Job has no retries of
its own, restarts are the monitor's, from the run's last checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from torchrelay.shared.cluster.kubernetes.outcome import attempt_outcome
from torchrelay.shared.cluster.port import Description, Ended, Phase, Status, WorkerJob
from torchrelay.shared.cluster.registry import TrainingConfig
from torchrelay.shared.errors import AlreadyExists, PermanentError

log = structlog.get_logger("torchrelay.cluster.kubernetes")
Object = dict[str, Any]
TICK_S = 5.0
"""How often a quiet attempt is looked at again (an unschedulable pod's time runs out)."""


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
        """Nothing to check up front: the cluster decides. A pod that no node can take fails
        the attempt after ``unschedulable_timeout_s``, naming the pod and the scheduler's
        message."""

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
                ended = attempt_outcome(
                    job,
                    list(pods.objects.values()),
                    now=datetime.now(UTC),
                    unschedulable_after_s=self.options.unschedulable_timeout_s,
                )
                if ended is not None:
                    if handle in self._cancelled:
                        return Ended(Status.CANCELLED, "cancelled")
                    if ended.status is Status.FAILED:
                        await self.api.delete("Job", handle)  # stop the other ranks now
                    return ended
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._requests.pop(handle, None)
            self._cancelled.discard(handle)

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
