"""The simulated serving backend: versions that get ready after a delay and answer inference
without loading any model.

For benchmarks and tests of the control plane only (``TORCHRELAY_ALLOW_SIMULATED_BACKEND=true``,
see :func:`~torchrelay.shared.cluster.simulated.require_opt_in`). The deployer checks a version
with a smoke inference over HTTP on the URLs ``ready`` returns, so something has to answer the
v2 protocol; rather than a server per version (a thousand deployments, a thousand ports), one
small aiohttp server per backend answers every version it runs, at a URL per replica:

- ``<base>/sim/<id>/<replica>/v2/models/<model>/versions/<version>/infer`` before promotion
  (``ready`` returns one such base URL per replica);
- ``http://<host>:<port>/v2/models/<model>`` (the stable endpoint) once promoted, with or
  without ``/versions/<version>``.

The answer is zeros shaped as the first output ``model.json`` declares (batch 1 for -1), so
any exported model passes, the simulated trainer's included. A version stops answering once
cancelled, replaced or undeployed. Versions live in the replica that started them (``adopt``
says None, as locally); the handle names that replica's port, and other replicas describe and
cancel its versions over ``GET``/``DELETE <base>/sim/<id>`` there, as local replicas do over
their servers' admin sockets (unauthenticated: a simulation on loopback, never production).
The endpoint's port is the serving replica's: a version rolled out by another replica, or a
model served again after its replica died, gets a new endpoint (ModelDeployed says which),
where the local backend keeps the model's port. No swap in place: every version rolls out anew.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from torchrelay.shared.cluster.port import Description, Ended, ModelVersion, Phase, Status
from torchrelay.shared.cluster.registry import ServingConfig
from torchrelay.shared.cluster.simulated import require_opt_in
from torchrelay.shared.errors import NotOwned
from torchrelay.shared.storage.files import ModelDescription
from torchrelay.shared.storage.layout import Layout

log = structlog.get_logger("torchrelay.cluster.simulated_serving")
_HANDLE = re.compile(r"simulated/[0-9]+/[0-9a-f]+")
STOPPED_KEPT = 4096
"""Handles of versions stopped here, remembered so that a late ``wait`` on one still ends."""


@dataclass(frozen=True)
class SimulatedServingRequest:
    model: str
    version: str
    replicas: int
    replacing: str | None


@dataclass
class _Version:
    request: SimulatedServingRequest
    ready_at: float
    promoted: bool = False
    ended: asyncio.Event = field(default_factory=asyncio.Event)


def zero_answer(description: ModelDescription, model: str, version: str) -> dict[str, Any]:
    """A v2 inference answer of zeros in the shape of the model's first declared output."""
    output = description.outputs[0]
    shape = [1 if dim == -1 else dim for dim in output.shape]
    count = 1
    for dim in shape:
        count *= dim
    zero: float | bool = False if output.datatype == "BOOL" else 0
    return {
        "model_name": model,
        "model_version": version,
        "id": "simulated",
        "outputs": [
            {
                "name": output.name,
                "datatype": output.datatype,
                "shape": shape,
                "data": [zero] * count,
            }
        ],
    }


class SimulatedServingBackend:
    name = "simulated"

    def __init__(self, storage_root: Path, *, ready_delay_s: float, host: str) -> None:
        self.layout = Layout(storage_root)
        self.ready_delay_s = ready_delay_s
        self.host = host
        self._versions: dict[str, _Version] = {}
        self._serving: dict[str, str] = {}
        """Model -> the handle on its endpoint."""
        self._stopped: dict[str, None] = {}  # insertion-ordered: the oldest is forgotten first
        self._runner: web.AppRunner | None = None
        self._port = 0

    async def start(self) -> None:
        """Listen on a free port of ``host``; :func:`open_serving` calls it."""
        app = web.Application()
        app.router.add_get("/sim/{id}", self._status)
        app.router.add_delete("/sim/{id}", self._cancel)
        app.router.add_post(
            "/sim/{id}/{replica}/v2/models/{model}/versions/{version}/infer", self._private
        )
        app.router.add_post("/v2/models/{model}/infer", self._stable)
        app.router.add_post("/v2/models/{model}/versions/{version}/infer", self._stable)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self._port = self._runner.addresses[0][1]

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self._port}"

    def check(self, work: ModelVersion) -> None:
        """Places any version: nothing runs."""

    def dryrun(self, work: ModelVersion) -> SimulatedServingRequest:
        return SimulatedServingRequest(work.model, work.version, work.replicas, work.replacing)

    async def schedule(self, request: SimulatedServingRequest) -> str:
        handle = f"simulated/{self._port}/{uuid.uuid4().hex[:12]}"
        ready_at = asyncio.get_running_loop().time() + self.ready_delay_s
        self._versions[handle] = _Version(request, ready_at)
        log.info("model_server.scheduled", handle=handle, simulated=True)
        return handle

    async def ready(self, handle: str) -> list[str]:
        version = self._versions[handle]
        await asyncio.sleep(max(0.0, version.ready_at - asyncio.get_running_loop().time()))
        return [f"{self._admin(handle)}/{i}" for i in range(version.request.replicas)]

    async def promote(self, handle: str) -> str:
        version = self._versions[handle]
        model = version.request.model
        if not version.promoted:
            version.promoted = True
            previous = self._serving.get(model)
            self._serving[model] = handle
            for replaced in {previous, version.request.replacing} - {None, handle}:
                await self.cancel(replaced)  # type: ignore[arg-type]
        return self.endpoint(model)

    def endpoint(self, model: str) -> str:
        return f"{self.base}/v2/models/{model}"

    async def describe(self, handle: str) -> Description | None:
        """This replica's versions as they are; another replica's as its server says."""
        version = self._versions.get(handle)
        if version is None:
            return await self._elsewhere(handle, "GET")
        ready = asyncio.get_running_loop().time() >= version.ready_at
        replicas = version.request.replicas
        return Description(
            handle,
            Phase.RUNNING if ready else Phase.PENDING,
            f"{replicas if ready else 0} of {replicas} simulated servers ready",
        )

    async def wait(self, handle: str) -> Ended:
        """Until the version is cancelled, replaced or undeployed (at once if it was)."""
        version = self._versions.get(handle)
        if version is None and handle not in self._stopped:
            raise NotOwned(f"no simulated version {handle!r} runs in this replica")
        if version is not None:
            await version.ended.wait()
        return Ended(Status.CANCELLED, "stopped")

    async def adopt(self, request: SimulatedServingRequest) -> str | None:
        """Never: a simulated version lives in the replica that started it."""
        return None

    async def cancel(self, handle: str) -> None:
        """Stop answering for the version: this replica's here, another's by asking its
        server (a version or server gone: nothing to do)."""
        version = self._versions.pop(handle, None)
        if version is None:
            await self._elsewhere(handle, "DELETE")
            return
        if self._serving.get(version.request.model) == handle:
            del self._serving[version.request.model]
        version.ended.set()
        self._stopped[handle] = None
        if len(self._stopped) > STOPPED_KEPT:
            del self._stopped[next(iter(self._stopped))]

    async def undeploy(self, model: str, handle: str | None) -> None:
        for mine, version in list(self._versions.items()):
            if version.request.model == model:
                await self.cancel(mine)
        if handle is not None:
            await self.cancel(handle)
        self._serving.pop(model, None)

    async def aclose(self) -> None:
        for handle in list(self._versions):
            await self.cancel(handle)
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def _admin(self, handle: str) -> str:
        """Where the server that runs ``handle``'s version answers for it."""
        _, port, token = handle.split("/")
        return f"http://{self.host}:{port}/sim/{token}"

    async def _elsewhere(self, handle: str, method: str) -> Description | None:
        """Describe (GET) or cancel (DELETE) a version another replica's server runs."""
        if not _HANDLE.fullmatch(handle):
            return None
        timeout = aiohttp.ClientTimeout(total=5)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as http,
                http.request(method, self._admin(handle)) as answer,
            ):
                if answer.status != 200:
                    return None
                said = await answer.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None  # its replica is gone, and the version with it
        return Description(handle, Phase(said["phase"]), str(said["detail"]))

    def _mine(self, request: web.Request) -> tuple[str, _Version]:
        handle = f"simulated/{self._port}/{request.match_info['id']}"
        version = self._versions.get(handle)
        if version is None:
            raise web.HTTPNotFound(text="no such simulated version here")
        return handle, version

    async def _status(self, request: web.Request) -> web.Response:
        described = await self.describe(self._mine(request)[0])
        assert described is not None  # noqa: S101 - it is this replica's
        return web.json_response({"phase": described.phase.value, "detail": described.detail})

    async def _cancel(self, request: web.Request) -> web.Response:
        with contextlib.suppress(web.HTTPNotFound):  # cancelling twice is success
            await self.cancel(self._mine(request)[0])
        return web.json_response({"phase": Phase.SUCCEEDED.value, "detail": "stopped"})

    async def _private(self, request: web.Request) -> web.Response:
        _, version = self._mine(request)
        model, asked = request.match_info["model"], request.match_info["version"]
        if (model, asked) != (version.request.model, version.request.version):
            raise web.HTTPNotFound(text=f"version {asked} of {model} is not served here")
        return await self._answer(model, asked)

    async def _stable(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        handle = self._serving.get(model)
        if handle is None:
            raise web.HTTPNotFound(text=f"model {model} is not served here")
        serving = self._versions[handle].request.version
        asked = request.match_info.get("version", serving)
        if asked != serving:
            raise web.HTTPNotFound(text=f"version {asked} of {model} is not served")
        return await self._answer(model, serving)

    async def _answer(self, model: str, version: str) -> web.Response:
        path = self.layout.model_description(model, version)
        try:
            description = await asyncio.to_thread(ModelDescription.read, path)
        except (OSError, ValueError) as exc:
            raise web.HTTPServiceUnavailable(text=f"cannot read {path}: {exc}") from exc
        return web.json_response(zero_answer(description, model, version))


async def open_serving(config: ServingConfig) -> SimulatedServingBackend:
    require_opt_in(os.environ, "serving")
    backend = SimulatedServingBackend(
        config.storage_root, ready_delay_s=config.simulated_ready_delay_s, host=config.host
    )
    await backend.start()
    return backend
