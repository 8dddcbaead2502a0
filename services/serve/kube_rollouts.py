"""Serving on Kubernetes: a Deployment and a Service per model.

A rollout puts the new version in the Deployment's pod template; Kubernetes surges new pods
(maxUnavailable 0: the old ones keep serving) and sends them traffic once their readiness probe
(``/v2/health/ready``) passes. The rollout succeeds only when every wanted replica runs the new
version and is available. If that does not happen in time, the old template goes back (its pods
never left) and the reason names the pods that did not get ready.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import structlog

from torchrelay.services.serve.rollouts import Current, RolloutFailed, Served
from torchrelay.shared.cluster.kubernetes.api import KubeApi, Mirror, Refused
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
from torchrelay.shared.errors import AlreadyExists, TransientError

log = structlog.get_logger("torchrelay.serve.kubernetes")
Object = dict[str, Any]


class KubernetesRollouts:
    name = "kubernetes"
    owns_servers = False

    def __init__(
        self,
        api: KubeApi,
        options: KubeOptions,
        *,
        storage_root: str,
        server_args: list[str],
        ready_timeout_s: float,
    ) -> None:
        self.api = api
        self.options = options
        self.storage_root = storage_root
        self.server_args = server_args
        self.ready_timeout_s = ready_timeout_s

    async def roll_out(self, model: str, version: str, replicas: int, current: Current) -> Served:
        model_json = Path(self.storage_root) / "models" / model / version / "model.json"
        if not await asyncio.to_thread(model_json.is_file):
            raise RolloutFailed(f"no model {model} version {version} on storage ({model_json})")
        try:
            return await self._roll_out(model, version, replicas)
        except Refused as exc:  # RBAC or an invalid object: say so in model.rollout.failed
            raise RolloutFailed(str(exc)) from exc

    async def _roll_out(self, model: str, version: str, replicas: int) -> Served:
        name = model_object_name(model)
        wanted = model_deployment(
            model,
            version,
            replicas,
            options=self.options,
            storage_root=self.storage_root,
            server_args=self.server_args,
            progress_deadline_s=int(self.ready_timeout_s),
        )
        with contextlib.suppress(AlreadyExists):
            await self.api.create("Service", model_service(model, self.options))
        previous = await self.api.get("Deployment", name)
        if previous is None:
            await self.api.create("Deployment", wanted)
        else:
            await self._put_template(name, wanted["spec"]["template"], replicas)
        problem = await self._until_available(name, model, version)
        if problem is None:
            log.info("model.rolled_out", model=model, version=version, replicas=replicas)
            return Served(model_endpoint(model, self.options))
        if previous is None:
            await self.api.delete("Deployment", name)  # nothing to go back to
        else:
            await self._put_template(
                name, previous["spec"]["template"], previous["spec"].get("replicas", 1)
            )
        log.warning("model.rolled_back", model=model, version=version, reason=problem)
        raise RolloutFailed(problem)

    async def serve_again(
        self, model: str, version: str, replicas: int, current: Current
    ) -> Served:
        """Nothing to do: the Deployment keeps serving whatever happens to a serve replica."""
        return Served(model_endpoint(model, self.options))

    async def _put_template(self, name: str, template: Object, replicas: int) -> None:
        """Replace the Deployment's template (compare-and-set on its resourceVersion)."""
        for _ in range(5):
            current = await self.api.get("Deployment", name)
            if current is None:
                raise RolloutFailed(f"the deployment {name} disappeared during the rollout")
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

    async def _until_available(self, name: str, model: str, version: str) -> str | None:
        """None once the rollout is done; else why it is not, after ``ready_timeout_s``."""
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
        selector = f"{model_selector(model)},{VERSION_LABEL}={version_label(version)}"
        pods, _ = await self.api.list("Pod", selector)
        details = "; ".join(pod_problems(pods)[:4]) or "no pod of it was created"
        return (
            f"version {version} was not available within {self.ready_timeout_s:g}s "
            f"({why}): {details}"
        )

    async def aclose(self) -> None:
        await self.api.client.close()
