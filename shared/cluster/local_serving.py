"""The local serving backend: model servers as processes on this machine.

A version starts on private ports (one per process), where it is checked; once it passes it
joins the model's stable port, which every version of that model shares through SO_REUSEPORT,
so clients talk to the servers directly (no proxy hop). The port is reserved by a bound,
non-listening socket held here, so nothing else takes it between versions. A retired version
stops listening, finishes what it has (answering with ``Connection: close``) and exits.

Joining the stable port and retiring are asked over each server's admin socket, a unix socket
of mode 0600 in the storage root's private ``serving/_admin`` folder: never over a port that
serves inference, and open only to this user, so to the serve replicas on this machine (which
find each other's servers through the sockets' paths in the deployment record).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import structlog

from torchrelay.shared.cluster.lifeline import parent_env

log = structlog.get_logger("torchrelay.cluster.serving")
SERVER_MODULE = "torchrelay.services.serve.server"
ADMIN_FOLDER = "_admin"
"""Under ``<storage root>/serving``; model names cannot contain ``_``, so it is no model's."""
SUN_PATH_MAX = 107
"""Bytes a unix socket's path may have (``sun_path`` is 108 on Linux, with its NUL)."""
ADMIN_TIMEOUT = aiohttp.ClientTimeout(total=10)
ADMIN_BASE = "http://model-server/admin"
"""The host part is never resolved: the admin connector dials the server's unix socket."""


@contextlib.contextmanager
def socket_address(path: Path) -> Iterator[str]:
    """An address that reaches the unix socket at ``path``, to bind or connect while open.

    A path longer than :data:`SUN_PATH_MAX` (a deep storage root) cannot be a socket's address;
    then the same file is named through an open descriptor of its folder,
    ``/proc/self/fd/<n>/<name>``, which Linux resolves like the long path.
    """
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield str(path)
        return
    if not sys.platform.startswith("linux"):
        raise OSError(
            f"the unix socket path {path} is longer than {SUN_PATH_MAX} bytes; "
            "use a shorter storage root"
        )
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{folder}/{path.name}"
    finally:
        os.close(folder)


class StartFailed(Exception):
    """A version's servers did not become ready; the reason carries their last log lines."""


@dataclass
class ServerProcess:
    process: asyncio.subprocess.Process
    log_path: Path
    admin: Path
    """The server's admin socket (serve-on, retire)."""
    port: int = 0
    """The server's private port: inference only, for the checks before it joins."""


@dataclass
class VersionHandle:
    model: str
    version: str
    servers: list[ServerProcess] = field(default_factory=list)

    @property
    def private_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{s.port}" for s in self.servers]

    @property
    def admin_sockets(self) -> list[str]:
        """Where the servers take control requests: what a replica needs to retire them."""
        return [str(s.admin) for s in self.servers]


@dataclass(frozen=True)
class ServerOptions:
    max_batch_size: int = 64
    max_delay_ms: float = 0.0
    max_queue: int = 512
    drain_s: float = 10.0


class LocalServing:
    name = "local"

    def __init__(
        self, storage_root: Path, *, host: str = "127.0.0.1", options: ServerOptions | None = None
    ) -> None:
        self.root = storage_root
        self.admin_folder = storage_root.absolute() / "serving" / ADMIN_FOLDER
        self.host = host
        self.options = options or ServerOptions()
        self._reservations: dict[str, socket.socket] = {}
        self._handles: list[VersionHandle] = []

    def model_dir(self, model: str, version: str) -> Path:
        return self.root / "models" / model / version

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

    def endpoint(self, model: str) -> str:
        return f"http://{self.host}:{self.stable_port(model)}/v2/models/{model}"

    async def start(
        self, model: str, version: str, replicas: int, timeout_s: float
    ) -> VersionHandle:
        handle = VersionHandle(model, version)
        self._handles.append(handle)
        folder = self.root / "serving" / model / version
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(self._private_admin_folder)
        options = self.options
        start = uuid.uuid4().hex[:8]  # a version may start again (rollback): fresh logs
        for index in range(replicas):
            log_path = folder / f"server-{start}-{index}.log"
            # Short and unique across replicas and restarts: the path must fit a socket address.
            admin = self.admin_folder / f"{uuid.uuid4().hex[:12]}.sock"
            with log_path.open("ab") as output:
                process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", SERVER_MODULE,
                    "--model-dir", str(self.model_dir(model, version)),
                    "--host", self.host, "--port", "0",
                    "--max-batch-size", str(options.max_batch_size),
                    "--max-delay-ms", str(options.max_delay_ms),
                    "--max-queue", str(options.max_queue),
                    "--drain-s", str(options.drain_s),
                    "--admin-socket", str(admin),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=output,
                    stderr=asyncio.subprocess.STDOUT,
                    env={**os.environ, "OMP_NUM_THREADS": "1", **parent_env()},
                    start_new_session=True,
                )  # fmt: skip
            handle.servers.append(ServerProcess(process, log_path, admin))
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*(self._ready(server) for server in handle.servers))
        except (StartFailed, TimeoutError) as exc:
            await self.stop(handle)
            reason = str(exc) if isinstance(exc, StartFailed) else f"not ready within {timeout_s}s"
            raise StartFailed(reason) from exc
        return handle

    def _private_admin_folder(self) -> None:
        self.admin_folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkdir's mode is masked and ignored for a folder that exists: set it outright.
        self.admin_folder.chmod(0o700)

    async def _ready(self, server: ServerProcess) -> None:
        while True:
            text = await asyncio.to_thread(server.log_path.read_text, errors="replace")
            for line in text.splitlines():
                if '"model.ready"' in line:
                    server.port = int(json.loads(line)["port"])
                    return
            if server.process.returncode is not None:
                tail = " | ".join(list(deque(text.splitlines(), maxlen=5)))
                raise StartFailed(f"the model server exited ({server.process.returncode}): {tail}")
            await asyncio.sleep(0.05)

    async def promote(self, handle: VersionHandle) -> str:
        """Join the stable port; returns the model's endpoint."""
        params = {"port": str(self.stable_port(handle.model)), "host": self.host}
        for server in handle.servers:
            await self._admin(server.admin, "serve-on", params)
        return self.endpoint(handle.model)

    async def retire(self, handle: VersionHandle) -> None:
        """Stop taking connections, drain, exit (in the background; bounded by drain_s)."""
        await self.retire_servers(handle.admin_sockets)
        asyncio.get_running_loop().create_task(self._reap(handle), name=f"reap:{handle.version}")

    async def retire_servers(self, admin_sockets: list[str]) -> None:
        """Ask servers (this replica's or another's) to drain and exit, through their admin
        sockets; gone ones are skipped."""
        for entry in admin_sockets:
            path = Path(entry)
            if path.parent != self.admin_folder:
                # Only sockets this backend hands out: not whatever path a record names (a
                # record from before admin sockets holds the servers' private URLs).
                log.warning("model_server.not_retired", server=entry, folder=self.admin_folder)
                continue
            try:
                await self._admin(path, "retire")
            except (aiohttp.ClientError, OSError) as exc:  # OSError: timeouts too
                # Most often the server is gone already (no socket, or nobody listening).
                log.info("model_server.not_retired", server=entry, reason=repr(exc))

    async def _admin(self, path: Path, action: str, params: dict[str, str] | None = None) -> None:
        with socket_address(path) as address:
            connector = aiohttp.UnixConnector(path=address)
            async with (
                aiohttp.ClientSession(connector=connector, timeout=ADMIN_TIMEOUT) as http,
                http.post(f"{ADMIN_BASE}/{action}", params=params) as response,
            ):
                response.raise_for_status()

    async def _reap(self, handle: VersionHandle) -> None:
        try:
            async with asyncio.timeout(self.options.drain_s + 10):
                await asyncio.gather(*(s.process.wait() for s in handle.servers))
        except TimeoutError:
            await self.stop(handle)
        with contextlib.suppress(ValueError):
            self._handles.remove(handle)

    async def stop(self, handle: VersionHandle) -> None:
        for server in handle.servers:
            if server.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.process.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(10):
                await asyncio.gather(*(s.process.wait() for s in handle.servers))
        except TimeoutError:
            for server in handle.servers:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.process.pid, signal.SIGKILL)
            await asyncio.gather(*(s.process.wait() for s in handle.servers))
        for server in handle.servers:
            server.admin.unlink(missing_ok=True)  # a killed server leaves its socket file
        with contextlib.suppress(ValueError):
            self._handles.remove(handle)

    async def aclose(self) -> None:
        for handle in list(self._handles):
            await self.stop(handle)
        for reservation in self._reservations.values():
            reservation.close()
        self._reservations.clear()
