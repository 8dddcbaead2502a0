"""The Kubernetes serving backend: a Deployment and a Service per model.

``schedule`` puts the version in the Deployment's pod template; Kubernetes surges new pods
(maxUnavailable 0: the old ones keep serving) and sends them traffic once their readiness probe
(``/v2/health/ready``) passes. ``ready`` waits until every wanted replica runs the new version
and is available, and returns the new pods' addresses for the deployer's smoke inference;
``cancel`` before ``promote`` puts the old template back (its pods never left). The Service is
the model's stable endpoint, whatever version serves.

The deployer's smoke inference runs once the new pods are ready, so they may answer a few
requests before it does; a version that fails it is rolled back within the same rollout.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import structlog

from torchrelay.shared.cluster.kubernetes.api import KubeApi, Mirror, Refused, connect
from torchrelay.shared.cluster.kubernetes.manifests import (
    VERSION_LABEL,
    model_deployment,
    model_endpoint,
    model_object_name,
    model_selector,
    model_service,
    version_label,
)
from torchrelay.shared.cluster.kubernetes.options import KubeOptions
from torchrelay.shared.cluster.kubernetes.outcome import pod_problems, rollout_state
from torchrelay.shared.cluster.port import (
    Description,
    Ended,
    ModelVersion,
    NotReady,
    Phase,
    Status,
)
from torchrelay.shared.cluster.registry import ServerOptions, ServingConfig
from torchrelay.shared.errors import AlreadyExists, PermanentError, TransientError

log = structlog.get_logger("torchrelay.serve.kubernetes")
Object = dict[str, Any]


@dataclass(frozen=True)
class KubeServingRequest:
    """The model's Deployment with the version in its template, and its Service."""

    model: str
    version: str
    deployment: Object
    service: Object

    @property
    def handle(self) -> str:
        return f"{self.model}/{self.version}"


@dataclass(frozen=True)
class _Previous:
    """What the Deployment ran before a rollout that has not been promoted yet."""

    template: Object | None
    replicas: int


class KubernetesServingBackend:
    name = "kubernetes"

    def __init__(
        self,
        api: KubeApi,
        options: KubeOptions,
        *,
        storage_root: str,
        server: ServerOptions | None = None,
        ready_timeout_s: float,
    ) -> None:
        self.api = api
        self.options = options
        self.storage_root = storage_root
        self.server = server or ServerOptions()
        self.ready_timeout_s = ready_timeout_s
        self._pending: dict[str, _Previous] = {}
        """Rollouts started here and not promoted: what a cancel goes back to."""

    def check(self, work: ModelVersion) -> None:
        """Nothing up front: the cluster decides, and ``ready`` names the pods that failed."""

    def dryrun(self, work: ModelVersion) -> KubeServingRequest:
        deployment = model_deployment(
            work.model,
            work.version,
            work.replicas,
            options=self.options,
            storage_root=self.storage_root,
            server_args=self.server.args(),
            progress_deadline_s=max(1, int(self.ready_timeout_s)),
        )
        service = model_service(work.model, self.options)
        return KubeServingRequest(work.model, work.version, deployment, service)

    async def schedule(self, request: KubeServingRequest) -> str:
        name = model_object_name(request.model)
        try:
            with contextlib.suppress(AlreadyExists):
                await self.api.create("Service", request.service)
            previous = await self.api.get("Deployment", name)
            if previous is None:
                await self.api.create("Deployment", request.deployment)
                self._pending[request.handle] = _Previous(None, 0)
            else:
                self._pending[request.handle] = _Previous(
                    previous["spec"]["template"], int(previous["spec"].get("replicas", 1))
                )
                await self._put_template(
                    name,
                    request.deployment["spec"]["template"],
                    int(request.deployment["spec"]["replicas"]),
                )
        except Refused as exc:  # RBAC or an invalid object: say so in model.rollout.failed
            raise NotReady(str(exc)) from exc
        return request.handle

    async def ready(self, handle: str) -> list[str]:
        model, version = _parse(handle)
        problem = await self._until_available(model, version)
        if problem is not None:
            await self.cancel(handle)
            log.warning("model.rolled_back", model=model, version=version, reason=problem)
            raise NotReady(problem)
        pods, _ = await self.api.list("Pod", _version_selector(model, version))
        return [
            f"http://{pod['status']['podIP']}:{self.options.server_port}"
            for pod in pods
            if _ready(pod) and (pod.get("status") or {}).get("podIP")
        ]

    async def promote(self, handle: str) -> str:
        """The Service already sends the new pods traffic: the rollout is kept."""
        model, version = _parse(handle)
        self._pending.pop(handle, None)
        log.info("model.rolled_out", model=model, version=version)
        return model_endpoint(model, self.options)

    async def describe(self, handle: str) -> Description | None:
        model, version = _parse(handle)
        deployment = await self.api.get("Deployment", model_object_name(model))
        if deployment is None or _template_version(deployment) != version_label(version):
            return None
        state, why = rollout_state(deployment)
        phase = {"done": Phase.RUNNING, "waiting": Phase.PENDING}.get(state, Phase.FAILED)
        return Description(handle, phase, why)

    async def wait(self, handle: str) -> Ended:
        """Until the Deployment no longer runs this version (another rolled out, or deleted)."""
        model, version = _parse(handle)
        name = model_object_name(model)
        mirror = Mirror(
            self.api, "Deployment", model_selector(model), timeout_s=self.options.watch_timeout_s
        )
        async for _ in mirror.follow():
            deployment = mirror.objects.get(name)
            if deployment is None:
                return Ended(Status.CANCELLED, f"the deployment {name} was deleted")
            serving = _template_version(deployment)
            if serving != version_label(version):
                return Ended(Status.CANCELLED, f"replaced by version {serving}")
        raise TransientError(f"the watch of {name} ended")  # follow() never ends by itself

    async def adopt(self, request: KubeServingRequest) -> str | None:
        """The Deployment outlives any serve replica: keep it if it runs this version."""
        deployment = await self.api.get("Deployment", model_object_name(request.model))
        if deployment is None or _template_version(deployment) != version_label(request.version):
            return None
        return request.handle

    async def cancel(self, handle: str) -> None:
        """A rollout not promoted yet goes back to the previous template (or its Deployment is
        deleted, when it was the first); a version that serves is taken down. A version the
        Deployment no longer runs is left alone."""
        model, version = _parse(handle)
        name = model_object_name(model)
        previous = self._pending.pop(handle, None)
        deployment = await self.api.get("Deployment", name)
        if deployment is None or _template_version(deployment) != version_label(version):
            return
        if previous is not None and previous.template is not None:
            await self._put_template(name, previous.template, previous.replicas)
        else:
            await self.api.delete("Deployment", name)

    async def undeploy(self, model: str, handle: str | None) -> None:
        """Delete the model's Deployment (its pods with it) and its Service, whatever version
        they run, and wait (up to ``ready_timeout_s``) until the Deployment is gone; objects
        already gone are fine."""
        name = model_object_name(model)
        for pending in [h for h in self._pending if _parse(h)[0] == model]:
            del self._pending[pending]  # nothing to go back to any more
        try:
            await self.api.delete("Deployment", name)
            await self.api.delete("Service", name)
        except Refused as exc:  # RBAC: the model stays up, and the request is dead-lettered
            raise PermanentError(f"cannot take model {model} down: {exc}") from exc
        await self._until_deleted(name)
        log.info("model.deleted", model=model, deployment=name, service=name)

    async def _until_deleted(self, name: str) -> None:
        """A foreground delete keeps the Deployment until its pods are gone: wait for that,
        so a deploy right after an undeploy creates a new one rather than updating one that
        is being deleted."""
        try:
            async with asyncio.timeout(self.ready_timeout_s):
                while True:  # polled: a watch would cost more than the few reads this takes
                    if await self.api.get("Deployment", name) is None:
                        return
                    await asyncio.sleep(0.5)
        except TimeoutError:
            log.warning("model.still_deleting", deployment=name)

    async def aclose(self) -> None:
        await self.api.client.close()

    async def _put_template(self, name: str, template: Object, replicas: int) -> None:
        """Replace the Deployment's template (compare-and-set on its resourceVersion)."""
        for _ in range(5):
            current = await self.api.get("Deployment", name)
            if current is None:
                raise NotReady(f"the deployment {name} disappeared during the rollout")
            body = {
                **current,
                "spec": {**current["spec"], "replicas": replicas, "template": template},
            }
            body.pop("status", None)
            try:
                await self.api.replace("Deployment", name, body)
            except AlreadyExists:  # 409: changed since we read it; read it again
                continue
            return
        raise TransientError(f"the deployment {name} keeps changing under the rollout")

    async def _until_available(self, model: str, version: str) -> str | None:
        """None once the rollout is done; else why it is not, after ``ready_timeout_s``."""
        name = model_object_name(model)
        mirror = Mirror(
            self.api, "Deployment", model_selector(model), timeout_s=self.options.watch_timeout_s
        )
        state, why = "waiting", "not observed yet"
        try:
            async with asyncio.timeout(self.ready_timeout_s):
                async for _ in mirror.follow():
                    deployment = mirror.objects.get(name)
                    if deployment is None:
                        continue
                    state, why = rollout_state(deployment)
                    if state != "waiting":
                        break
        except TimeoutError:
            pass
        if state == "done":
            return None
        pods, _ = await self.api.list("Pod", _version_selector(model, version))
        details = "; ".join(pod_problems(pods)[:4]) or "no pod of it was created"
        return (
            f"version {version} was not available within {self.ready_timeout_s:g}s "
            f"({why}): {details}"
        )


def _parse(handle: str) -> tuple[str, str]:
    model, _, version = handle.partition("/")
    return model, version


def _version_selector(model: str, version: str) -> str:
    return f"{model_selector(model)},{VERSION_LABEL}={version_label(version)}"


def _template_version(deployment: Object) -> str | None:
    labels = deployment["spec"]["template"]["metadata"].get("labels") or {}
    found: str | None = labels.get(VERSION_LABEL)
    return found


def _ready(pod: Object) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


async def open_serving(config: ServingConfig) -> KubernetesServingBackend:
    return KubernetesServingBackend(
        await connect(config.kube),
        config.kube,
        storage_root=str(config.storage_root),
        server=config.server,
        ready_timeout_s=config.ready_timeout_s,
    )
