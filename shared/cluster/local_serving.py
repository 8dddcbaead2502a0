"""The local serving backend: model servers as processes on this machine.

A version starts on private ports (one per process), where the deployer checks it; once it
passes it joins the model's stable port, which every version of that model shares through
SO_REUSEPORT, so clients talk to the servers directly (no proxy hop). The port is reserved by
a bound, non-listening socket held here, so nothing else takes it between versions. A retired
version stops listening, finishes what it has (answering with ``Connection: close``) and exits.

Joining the stable port and retiring are asked over each server's admin socket, a unix socket
of mode 0600 in the storage root's private ``serving/_admin`` folder: never over a port that
serves inference, and open only to this user, so to the serve replicas on this machine (which
find each other's servers through the handle in the deployment record: it names the start
whose sockets they are, and the model's port).

The servers are children of the replica that started them and die with it (``parent_env``):
another replica serves the model again (``adopt`` says None), on the same port.

A new version of the same model (same signature and architecture) can also replace the
serving one in place (``stage``, then ``switch``): the running servers load its weights beside
the old ones, answer it on their private ports for the deployer's checks, and switch between
two batches. No process starts, no port changes, no connection drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import sys
import uuid
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from torchrelay.shared.cluster.lifeline import parent_env
from torchrelay.shared.cluster.port import (
    Description,
    Ended,
    ModelVersion,
    NotReady,
    Phase,
    Status,
)
from torchrelay.shared.cluster.registry import ServerOptions, ServingConfig
from torchrelay.shared.cluster.unix_sockets import SUN_PATH_MAX, socket_address
from torchrelay.shared.errors import NotOwned
from torchrelay.shared.storage.layout import Layout

__all__ = ["SUN_PATH_MAX", "LocalServingBackend", "open_serving", "socket_address"]
log = structlog.get_logger("torchrelay.cluster.serving")
SERVER_MODULE = "torchrelay.services.serve.server"
ADMIN_TIMEOUT = aiohttp.ClientTimeout(total=10)
ADMIN_BASE = "http://model-server/admin"
"""The host part is never resolved: the admin connector dials the server's unix socket."""
_HANDLE = re.compile(r"^local:([0-9a-f]{12}):(\d{1,5}):(\d{1,2})$")


@dataclass(frozen=True)
class ServerLaunch:
    argv: list[str]
    env: dict[str, str]
    log_path: str
    admin_socket: str


@dataclass(frozen=True)
class LocalServingRequest:
    """What ``schedule`` starts: one process per server, each with its admin socket."""

    model: str
    version: str
    start: str
    """This start's id: names its log files and admin sockets (a version may start again)."""
    servers: list[ServerLaunch]
    replacing: str | None


@dataclass(frozen=True)
class _Handle:
    """What a handle says, to this backend alone: the start, the model's port, how many."""

    start: str
    port: int
    servers: int

    def __str__(self) -> str:
        return f"local:{self.start}:{self.port}:{self.servers}"

    @classmethod
    def parse(cls, text: str | None) -> _Handle | None:
        match = _HANDLE.match(text or "")
        if match is None:
            return None
        return cls(match[1], int(match[2]), int(match[3]))


@dataclass
class _Server:
    process: asyncio.subprocess.Process
    log_path: Path
    admin: Path
    port: int = 0
    """Its private port: inference only, for the checks before it joins."""


@dataclass
class _Version:
    """A version whose servers are this replica's children."""

    request: LocalServingRequest
    handle: _Handle
    servers: list[_Server] = field(default_factory=list)
    ready: bool = False
    promoted: bool = False
    stopping: bool = False
    crashed: int | None = None
    """The index of the server whose exit ended the version, if it was a crash."""
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class LocalServingBackend:
    name = "local"

    def __init__(
        self,
        storage_root: Path,
        *,
        host: str = "127.0.0.1",
        options: ServerOptions | None = None,
        ready_timeout_s: float = 60.0,
    ) -> None:
        self.root = storage_root
        self.layout = Layout(storage_root.absolute())
        self.admin_folder = self.layout.admin_sockets()
        self.host = host
        self.options = options or ServerOptions()
        self.ready_timeout_s = ready_timeout_s
        self._reservations: dict[str, socket.socket] = {}
        self._versions: dict[str, _Version] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # --- the request -------------------------------------------------------------------------

    def check(self, work: ModelVersion) -> None:
        """Anything this machine can start; a model that does not load fails ``ready``."""

    def dryrun(self, work: ModelVersion) -> LocalServingRequest:
        start = uuid.uuid4().hex[:12]
        logs = self.layout.serving_logs(work.model, work.version)
        model_dir = self.layout.model(work.model, work.version)
        servers = []
        for index in range(work.replicas):
            admin = self.admin_folder / f"{start}-{index}.sock"
            argv = [
                sys.executable, "-m", SERVER_MODULE,
                "--model-dir", str(model_dir),
                "--host", self.host, "--port", "0",
                *self.options.args(),
                "--admin-socket", str(admin),
            ]  # fmt: skip
            servers.append(
                ServerLaunch(
                    argv=argv,
                    env={"OMP_NUM_THREADS": "1", **parent_env()},
                    log_path=str(logs / f"server-{start}-{index}.log"),
                    admin_socket=str(admin),
                )
            )
        return LocalServingRequest(work.model, work.version, start, servers, work.replacing)

    # --- the lifecycle ---------------------------------------------------------------------

    async def schedule(self, request: LocalServingRequest) -> str:
        """Start the servers on private ports; the model's port is reserved (the one the
        replaced version has, so clients keep their address)."""
        replaced = _Handle.parse(request.replacing)
        try:
            port = self.stable_port(request.model, replaced.port if replaced else None)
        except OSError as exc:
            raise NotReady(f"the model's port cannot be reserved here: {exc}") from exc
        handle = _Handle(request.start, port, len(request.servers))
        version = _Version(request, handle)
        self._versions[str(handle)] = version
        await asyncio.to_thread(self._folders, request)
        try:
            for launch in request.servers:
                output = await asyncio.to_thread(Path(launch.log_path).open, "ab")
                try:
                    process = await asyncio.create_subprocess_exec(
                        *launch.argv,
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=output,
                        stderr=asyncio.subprocess.STDOUT,
                        env={**os.environ, **launch.env},
                        start_new_session=True,
                    )
                finally:
                    output.close()
                version.servers.append(
                    _Server(process, Path(launch.log_path), Path(launch.admin_socket))
                )
        except BaseException:
            await self._stop(version)
            raise
        self._supervise(self._watch(version), f"serve:{request.model}:{request.version}")
        return str(handle)

    async def ready(self, handle: str) -> list[str]:
        version = self._own(handle)
        try:
            async with asyncio.timeout(self.ready_timeout_s):
                await asyncio.gather(*(self._ready(server) for server in version.servers))
        except (NotReady, TimeoutError) as exc:
            await self._stop(version)
            reason = str(exc) or f"not ready within {self.ready_timeout_s:g}s"
            raise NotReady(f"version {version.request.version} did not start: {reason}") from exc
        version.ready = True
        return [f"http://127.0.0.1:{server.port}" for server in version.servers]

    async def promote(self, handle: str) -> str:
        version = self._own(handle)
        model = version.request.model
        if not version.promoted:
            try:
                port = self.stable_port(model, version.handle.port)
                for server in version.servers:
                    await self._admin(
                        server.admin, "serve-on", {"port": str(port), "host": self.host}
                    )
            except (OSError, aiohttp.ClientError) as exc:
                await self._stop(version)
                raise NotReady(
                    f"version {version.request.version} could not join its port: {exc}"
                ) from exc
            version.promoted = True
            replaced = version.request.replacing
            if replaced is not None and replaced != handle:
                await self.cancel(replaced)
        return self.endpoint(model, version.handle.port)

    async def stage(self, handle: str, version: str) -> list[str]:
        """Have the servers behind ``handle`` (this replica's, promoted) load ``version`` of
        their model beside the serving one; returns their private URLs, where it answers
        requests that name it. :class:`NotReady` says why not (not this replica's servers,
        not the same model: another signature or architecture, a model that does not load),
        with nothing left staged."""
        running = self._versions.get(handle)
        if running is None or not running.promoted or running.stopping:
            raise NotReady(f"{handle} is not served by this replica's running servers")
        folder = self.layout.model(running.request.model, version)
        params = {"model-dir": str(folder)}
        # Loading the weights may take as long as a new server's start.
        loading = aiohttp.ClientTimeout(total=self.ready_timeout_s)
        try:
            await asyncio.gather(
                *(self._admin(s.admin, "stage", params, limit=loading) for s in running.servers)
            )
        except (OSError, aiohttp.ClientError) as exc:
            await self.unstage(handle)
            problem = f"version {version} cannot replace the serving one in place: {exc}"
            raise NotReady(problem) from exc
        return [f"http://127.0.0.1:{server.port}" for server in running.servers]

    async def switch(self, handle: str, version: str) -> str:
        """Make the staged ``version`` the serving one on every server behind ``handle``, all
        at once (each between two of its batches); returns the model's endpoint. The handle
        stays: the same servers now serve ``version``.

        All or nothing: when a server does not switch, the ones that did switch back to the
        version they served (each keeps it staged until the unstage), so every server serves
        one version, the old one, when :class:`NotReady` is raised."""
        running = self._versions.get(handle)
        if running is None or not running.promoted or running.stopping:
            raise NotReady(f"{handle} is not served by this replica's running servers")
        previous = running.request.version
        results = await asyncio.gather(
            *(self._admin(s.admin, "switch", {"version": version}) for s in running.servers),
            return_exceptions=True,
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            switched = [s for s, r in zip(running.servers, results, strict=True) if r is None]
            for server in switched:
                with contextlib.suppress(OSError, aiohttp.ClientError):
                    await self._admin(server.admin, "switch", {"version": previous})
            await self.unstage(handle)
            raise NotReady(f"version {version} did not switch in place: {failed[0]}")
        await self.unstage(handle)  # the old weights, kept for a switch back, are freed
        running.request = dataclasses.replace(running.request, version=version)
        return self.endpoint(running.request.model, running.handle.port)

    async def unstage(self, handle: str) -> None:
        """Drop whatever is staged on the servers behind ``handle`` (best effort)."""
        running = self._versions.get(handle)
        for server in running.servers if running is not None else []:
            with contextlib.suppress(OSError, aiohttp.ClientError):
                await self._admin(server.admin, "unstage")

    async def describe(self, handle: str) -> Description | None:
        """This replica's servers from their processes; another replica's from whether their
        admin sockets answer."""
        version = self._versions.get(handle)
        if version is not None:
            alive = sum(s.process.returncode is None for s in version.servers)
            detail = f"{alive} of {len(version.servers)} servers running"
            if alive < len(version.servers):
                return Description(handle, Phase.FAILED, detail)
            return Description(handle, Phase.RUNNING if version.ready else Phase.PENDING, detail)
        parsed = _Handle.parse(handle)
        if parsed is None:
            return None
        answering = 0
        for path in self._admin_sockets(parsed):
            with contextlib.suppress(OSError):
                with socket_address(path) as address:
                    _, writer = await asyncio.wait_for(asyncio.open_unix_connection(address), 5)
                writer.close()
                await writer.wait_closed()
                answering += 1
        if answering == 0:
            return None
        return Description(
            handle, Phase.RUNNING, f"{answering} of {parsed.servers} servers answer (elsewhere)"
        )

    async def wait(self, handle: str) -> Ended:
        """Until the version's servers stop: cancelled or retired, or one of them died."""
        version = self._versions.get(handle)
        if version is None:
            raise NotOwned(f"no local model servers {handle!r} run in this replica")
        await version.ended.wait()
        return self._ending(version)

    async def adopt(self, request: LocalServingRequest) -> str | None:
        """Never: model servers are children of the replica that started them."""
        return None

    async def cancel(self, handle: str) -> None:
        """Stop a version's servers: this replica's by signal, another's by asking them to
        retire over their admin sockets (they drain, then exit). Servers gone are skipped."""
        version = self._versions.get(handle)
        if version is not None:
            if version.promoted:  # taking traffic: drain it
                await self._retire(version)
            else:
                await self._stop(version)
            return
        parsed = _Handle.parse(handle)
        if parsed is None:
            log.warning("model_server.not_retired", handle=handle, reason="not a local handle")
            return
        for path in self._admin_sockets(parsed):
            try:
                await self._admin(path, "retire")
            except (aiohttp.ClientError, OSError) as exc:  # OSError: timeouts too
                # Most often the server is gone already (no socket, or nobody listening).
                log.info("model_server.not_retired", server=str(path), reason=repr(exc))

    async def undeploy(self, model: str, handle: str | None) -> None:
        """This replica's servers of ``model`` retire (drain, then exit; stopped when not
        promoted yet), another replica's, named by ``handle``, are asked to over their admin
        sockets, and the model's port is let go. Returns once they have exited (or were
        stopped after the drain bound)."""
        mine = [v for v in list(self._versions.values()) if v.request.model == model]
        await asyncio.gather(*(self._take_down(version) for version in mine))
        if handle is not None and handle not in {str(v.handle) for v in mine}:
            await self.cancel(handle)
            await self._until_gone(handle)
        reservation = self._reservations.pop(model, None)
        if reservation is not None:
            reservation.close()

    async def aclose(self) -> None:
        for version in list(self._versions.values()):
            await self._stop(version)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for reservation in self._reservations.values():
            reservation.close()
        self._reservations.clear()

    # --- the parts -------------------------------------------------------------------------

    def stable_port(self, model: str, port: int | None = None) -> int:
        """The model's port for good: reserved on first use, shared by all its versions (and
        by every replica that serves them: pass the port the model already has)."""
        held = self._reservations.get(model)
        if held is not None and port not in (None, held.getsockname()[1]):
            held.close()
            held = None
        if held is None:
            held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                held.bind((self.host, port or 0))
            except OSError:
                held.close()
                raise
            self._reservations[model] = held
        bound: int = held.getsockname()[1]
        return bound

    def endpoint(self, model: str, port: int) -> str:
        return f"http://{self.host}:{port}/v2/models/{model}"

    def _own(self, handle: str) -> _Version:
        version = self._versions.get(handle)
        if version is None:
            raise NotOwned(f"no local model servers {handle!r} run in this replica")
        return version

    def _admin_sockets(self, handle: _Handle) -> list[Path]:
        return [self.admin_folder / f"{handle.start}-{i}.sock" for i in range(handle.servers)]

    def _folders(self, request: LocalServingRequest) -> None:
        for launch in request.servers:
            Path(launch.log_path).parent.mkdir(parents=True, exist_ok=True)
        self.admin_folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkdir's mode is masked and ignored for a folder that exists: set it outright.
        self.admin_folder.chmod(0o700)

    def _supervise(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Background work of this backend: referenced until done, its failure logged."""
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("serving.task_failed", task=name, error=repr(task.exception()))

        task.add_done_callback(done)

    async def _watch(self, version: _Version) -> None:
        """Mark the version ended once its servers exit: when one crashes, at once, stopping
        the rest; when they exit cleanly (another replica retired them: it asks every one of
        them), once all of them have drained."""
        waits = [asyncio.ensure_future(s.process.wait()) for s in version.servers]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if not version.stopping:
            codes = [s.process.returncode for s in version.servers]
            crashed = next((i for i, code in enumerate(codes) if code not in (None, 0)), None)
            if crashed is None:
                log.info(
                    "model_server.retired",
                    model=version.request.model,
                    version=version.request.version,
                )
                await self._reap(version)
            else:
                version.crashed = crashed
                log.warning(
                    "model_server.exited",
                    model=version.request.model,
                    version=version.request.version,
                    code=codes[crashed],
                )
                await self._stop(version)
        version.ended.set()

    def _ending(self, version: _Version) -> Ended:
        if version.crashed is not None:  # stopping too by now: the rest were stopped
            index = version.crashed
            server = version.servers[index]
            code = server.process.returncode
            return Ended(
                Status.FAILED,
                f"model server {index} exited ({code})",
                rank=index,
                exit_code=code,
                log_tail=_tail(server.log_path),
            )
        if version.stopping:
            return Ended(Status.CANCELLED, "stopped")
        return Ended(Status.FAILED, "the model servers exited")

    async def _ready(self, server: _Server) -> None:
        while True:
            text = await asyncio.to_thread(server.log_path.read_text, errors="replace")
            for line in text.splitlines():
                if '"model.ready"' in line:
                    server.port = int(json.loads(line)["port"])
                    return
            if server.process.returncode is not None:
                tail = " | ".join(list(deque(text.splitlines(), maxlen=5)))
                raise NotReady(f"the model server exited ({server.process.returncode}): {tail}")
            await asyncio.sleep(0.05)

    async def _admin(
        self,
        path: Path,
        action: str,
        params: dict[str, str] | None = None,
        *,
        limit: aiohttp.ClientTimeout = ADMIN_TIMEOUT,
    ) -> None:
        with socket_address(path) as address:
            connector = aiohttp.UnixConnector(path=address)
            async with (
                aiohttp.ClientSession(connector=connector, timeout=limit) as http,
                http.post(f"{ADMIN_BASE}/{action}", params=params) as response,
            ):
                if response.status >= 400:  # the server's reason, not just the status's
                    raise aiohttp.ClientResponseError(
                        response.request_info,
                        response.history,
                        status=response.status,
                        message=(await response.text())[:300],
                    )

    async def _retire(self, version: _Version) -> None:
        """Stop taking connections, drain, exit; bounded by drain_s, then stopped."""
        await self._ask_to_retire(version)
        self._supervise(self._reap(version), f"reap:{version.request.version}")

    async def _ask_to_retire(self, version: _Version) -> None:
        version.stopping = True
        for server in version.servers:
            try:
                await self._admin(server.admin, "retire")
            except (aiohttp.ClientError, OSError) as exc:
                log.info("model_server.not_retired", server=str(server.admin), reason=repr(exc))

    async def _take_down(self, version: _Version) -> None:
        """One of this replica's versions, for good: drained if it takes traffic."""
        if version.promoted:
            await self._ask_to_retire(version)
            await self._reap(version)
        else:
            await self._stop(version)

    async def _until_gone(self, handle: str) -> None:
        """Until another replica's servers behind ``handle`` no longer answer on their admin
        sockets (they drain within drain_s); past that bound, say so and go on."""
        try:
            async with asyncio.timeout(self.options.drain_s + 10):
                while True:  # polled: their exit is seen only as sockets that stop answering
                    if await self.describe(handle) is None:
                        return
                    await asyncio.sleep(0.1)
        except TimeoutError:
            log.warning("model_server.still_running", handle=handle)

    async def _reap(self, version: _Version) -> None:
        try:
            async with asyncio.timeout(self.options.drain_s + 10):
                await asyncio.gather(*(s.process.wait() for s in version.servers))
        except TimeoutError:
            pass
        await self._stop(version)

    async def _stop(self, version: _Version) -> None:
        version.stopping = True
        servers = version.servers
        for server in servers:
            if server.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.process.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(10):
                await asyncio.gather(*(s.process.wait() for s in servers))
        except TimeoutError:
            for server in servers:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.process.pid, signal.SIGKILL)
            await asyncio.gather(*(s.process.wait() for s in servers))
        for server in servers:
            server.admin.unlink(missing_ok=True)  # a killed server leaves its socket file
        self._versions.pop(str(version.handle), None)
        version.ended.set()


def _tail(path: Path, lines: int = 20) -> list[str]:
    try:
        with path.open(errors="replace") as handle:
            return [line.rstrip("\n")[:500] for line in deque(handle, maxlen=lines)]
    except OSError:
        return []


async def open_serving(config: ServingConfig) -> LocalServingBackend:
    return LocalServingBackend(
        config.storage_root.resolve(),
        host=config.host,
        options=config.server,
        ready_timeout_s=config.ready_timeout_s,
    )
