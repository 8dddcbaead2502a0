"""How a version gets served: the serve service's two backends behind one interface.

``LocalRollouts`` runs model servers as processes here (checked on private ports, then joined
to the model's stable port over their admin sockets); they belong to this replica and die with
it. ``KubernetesRollouts``
(in :mod:`.kube_rollouts`) rolls a Deployment per model and lets Kubernetes keep it running.
The Deployer above them never asks which one it has, beyond whether a dead replica's models
need serving again (``owns_servers``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from torchrelay.services.serve.domain import smoke_ok, smoke_request
from torchrelay.shared.cluster.local_serving import LocalServing, StartFailed, VersionHandle


class RolloutFailed(Exception):
    """The version did not become ready; the old one, if any, keeps serving."""


@dataclass(frozen=True)
class Current:
    """What serves the model now, as its deployment record says."""

    version: str | None = None
    replicas: int = 1
    port: int | None = None
    servers: tuple[str, ...] = ()
    """How to reach its servers' control (local: their admin sockets), to retire them."""
    owned_here: bool = False


@dataclass(frozen=True)
class Served:
    endpoint: str
    port: int | None = None
    servers: tuple[str, ...] = field(default_factory=tuple)
    """What :attr:`Current.servers` will say of this version (local: its admin sockets)."""


class Rollouts(Protocol):
    name: str
    owns_servers: bool
    """True when a replica's servers die with it (then another replica serves them again)."""

    async def roll_out(self, model: str, version: str, replicas: int, current: Current) -> Served:
        """Serve ``version`` instead of ``current``; :class:`RolloutFailed` if it never gets
        ready (and ``current`` still serves)."""
        ...

    async def serve_again(
        self, model: str, version: str, replicas: int, current: Current
    ) -> Served:
        """Serve ``version`` once more, on the model's endpoint (its servers are gone)."""
        ...

    async def aclose(self) -> None: ...


class LocalRollouts:
    """Model servers as local processes: started on private ports, checked (ready, then a
    smoke inference on the declared signature), then joined to the model's stable port; the
    old version's servers are retired, this replica's or another's. Joining and retiring go
    through the servers' admin sockets, never their TCP ports."""

    name = "local"
    owns_servers = True

    def __init__(self, serving: LocalServing, *, ready_timeout_s: float) -> None:
        self.serving = serving
        self._ready_timeout_s = ready_timeout_s
        self._active: dict[str, VersionHandle] = {}
        """Versions whose servers are this replica's children."""

    async def roll_out(self, model: str, version: str, replicas: int, current: Current) -> Served:
        handle = await self._start_checked(model, version, replicas)
        endpoint = await self._promote(handle, current.port)
        mine = self._active.pop(model, None)
        if mine is not None:
            await self.serving.retire(mine)
        if not current.owned_here and current.servers:
            await self.serving.retire_servers(list(current.servers))  # another replica's
        self._active[model] = handle
        return Served(endpoint, self.serving.stable_port(model), tuple(handle.admin_sockets))

    async def serve_again(
        self, model: str, version: str, replicas: int, current: Current
    ) -> Served:
        handle = await self._start_checked(model, version, replicas)
        endpoint = await self._promote(handle, current.port)
        self._active[model] = handle
        return Served(endpoint, self.serving.stable_port(model), tuple(handle.admin_sockets))

    async def _start_checked(self, model: str, version: str, replicas: int) -> VersionHandle:
        folder = self.serving.model_dir(model, version)
        try:
            description: dict[str, Any] = json.loads((folder / "model.json").read_text())
        except (OSError, ValueError) as exc:
            raise RolloutFailed(f"no model {model} version {version} on storage ({exc})") from exc
        try:
            handle = await self.serving.start(model, version, replicas, self._ready_timeout_s)
        except StartFailed as exc:
            raise RolloutFailed(f"version {version} did not start: {exc}") from exc
        try:
            await self._smoke(handle, description)
        except RolloutFailed:
            await self.serving.stop(handle)
            raise
        return handle

    async def _smoke(self, handle: VersionHandle, description: dict[str, Any]) -> None:
        request = smoke_request(description)
        timeout = aiohttp.ClientTimeout(total=self._ready_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for url in handle.private_urls:
                target = f"{url}/v2/models/{handle.model}/versions/{handle.version}/infer"
                try:
                    async with http.post(target, json=request) as response:
                        answer = await response.json(content_type=None)
                        status = response.status
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    raise RolloutFailed(f"the smoke inference failed: {exc!r}") from exc
                if status != 200:
                    raise RolloutFailed(f"the smoke inference answered HTTP {status}: {answer}")
                if (problem := smoke_ok(description, answer)) is not None:
                    raise RolloutFailed(problem)

    async def _promote(self, handle: VersionHandle, port: int | None) -> str:
        """Join the model's port: the one it has (whoever served it before) or a new one."""
        try:
            self.serving.stable_port(handle.model, port)
            return await self.serving.promote(handle)
        except (OSError, aiohttp.ClientError) as exc:
            await self.serving.stop(handle)
            raise RolloutFailed(f"version {handle.version} could not join its port: {exc}") from exc

    async def aclose(self) -> None:
        await self.serving.aclose()
