"""The local platform: a real nats-server and the four services as processes on loopback.

``torchrelay up`` runs it in the foreground and supervises it: a service process that dies is
started again (with a growing pause if it keeps dying), as a Kubernetes Deployment would, and
the other replicas take its work over meanwhile. ``torchrelay up --detach`` runs that same
supervisor in the background and returns once every service is ready; ``torchrelay down``
stops it. ``torchrelay demo`` starts one if none is running. The running platform is described
in ``<state>/platform.json`` for the other commands; the state folder is found by
:func:`resolve_state_dir`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchrelay.shared.bus import principals
from torchrelay.shared.bus.connection import with_credentials
from torchrelay.shared.bus.server import NatsServer
from torchrelay.shared.errors import ConfigError
from torchrelay.shared.storage import atomic_write_bytes

SERVICES = ("ingest", "train", "serve", "monitor")
STATE_DIR_VARIABLE = "TORCHRELAY_STATE_DIR"
RESTART_PAUSES_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STEADY_AFTER_S = 60.0
"""A replica that ran this long before dying is restarted at once again."""
NATS_PORT = 4222
"""The embedded NATS listens here when the port is free (else on any free port, and says so)."""
UP_LOG = "up.log"
"""The detached supervisor's own output, under ``<state>/logs``."""


def resolve_state_dir(
    given: Path | None,
    *,
    environ: Mapping[str, str] | None = None,
    home: Path | None = None,
) -> Path:
    """Where the platform keeps its state: ``--state-dir``, else ``$TORCHRELAY_STATE_DIR``,
    else the user's own ``$XDG_STATE_HOME/torchrelay`` (``~/.local/state/torchrelay`` when
    that is unset or not absolute, as the XDG base directory specification says). The same
    folder whatever the current directory, so every command finds the running platform."""
    environ = os.environ if environ is None else environ
    if given is not None:
        return given
    if environ.get(STATE_DIR_VARIABLE):
        return Path(environ[STATE_DIR_VARIABLE])
    xdg = environ.get("XDG_STATE_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "torchrelay"
    return (Path.home() if home is None else home) / ".local" / "state" / "torchrelay"


def nats_note(port: int) -> str | None:
    """What to say about the port the platform's own NATS got: nothing when it is the
    well-known one that clients default to."""
    if port == NATS_PORT:
        return None
    return (
        f"port {NATS_PORT} was taken (another NATS?), so this NATS listens on {port}: "
        'clients find it with `eval "$(torchrelay env)"`'
    )


@dataclass
class Replica:
    """One service process."""

    service: str
    index: int
    process: subprocess.Popen[bytes]
    port: int = 0
    started: float = field(default_factory=time.monotonic)
    restarts: int = 0
    due: float | None = None
    """When a dead replica is to be started again."""
    starting: bool = False
    """Started again, and not ready yet."""

    @property
    def name(self) -> str:
        return f"{self.service}-{self.index}"


@dataclass
class Platform:
    state_dir: Path
    nats_url: str
    nats: NatsServer | None = None
    replicas: list[Replica] = field(default_factory=list)
    passwords: dict[str, str] | None = None
    """The NATS users' passwords when this platform runs its own NATS with authorization."""
    nats_due: float | None = None
    """When a dead nats-server is to be started again."""
    nats_restarts: int = 0
    nats_note: str | None = None
    """Why the platform's own NATS is not on :data:`NATS_PORT`."""

    @property
    def storage_root(self) -> Path:
        return self.state_dir / "storage"

    def log_path(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{name}.log"

    def describe(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "nats_url": self.nats_url,
            "nats_note": self.nats_note,
            "nats_pid": self.nats.pid if self.nats is not None else None,
            "state_dir": str(self.state_dir.resolve()),
            "storage_root": str(self.storage_root.resolve()),
            "services": {
                r.name: {"url": f"http://127.0.0.1:{r.port}", "pid": r.process.pid}
                for r in self.replicas
            },
        }

    def save(self) -> None:
        path = self.state_dir / "platform.json"
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.describe(), indent=2))
        temporary.replace(path)


def users_file(state_dir: Path) -> Path:
    return state_dir / "nats" / "users.json"


def nats_passwords(state_dir: Path) -> dict[str, str]:
    """Every NATS user's password (:mod:`~torchrelay.shared.bus.principals`): random, made on
    first use and kept in a file only its owner may read, so restarts keep them."""
    path = users_file(state_dir)
    try:
        stored: dict[str, str] = json.loads(path.read_text())
    except FileNotFoundError:
        stored = {}
    missing = [user for user in principals.USERS if user not in stored]
    if missing:
        stored.update({user: secrets.token_urlsafe(24) for user in missing})
        atomic_write_bytes(path, json.dumps(stored, indent=2).encode(), private=True)
    return stored


def client_url(state_dir: Path, nats_url: str, user: str = principals.ADMIN) -> str:
    """``nats_url`` with ``user``'s credentials, when the platform runs with authorization."""
    if not users_file(state_dir).exists():
        return nats_url
    return with_credentials(nats_url, user, nats_passwords(state_dir)[user])


def start_nats(state_dir: Path, passwords: dict[str, str]) -> NatsServer:
    """nats-server on :data:`NATS_PORT` when that port is free, else on any free port (see
    :func:`nats_note`)."""
    authorization = principals.server_authorization(passwords)
    try:
        return _start_server(
            NatsServer(state_dir / "nats", port=NATS_PORT, authorization=authorization)
        )
    except ConfigError as exc:
        if "address already in use" not in str(exc):
            raise
    return _start_server(NatsServer(state_dir / "nats", authorization=authorization))


def _start_server(server: NatsServer) -> NatsServer:
    try:
        return server.start()
    except BaseException:
        server.stop()  # interrupted (SIGTERM while `up` starts): nothing left running
        raise


def summary(described: Mapping[str, Any]) -> list[str]:
    """What ``up`` says once the platform is ready: where NATS and each service listen, the
    logs, the storage and the state folder (from ``platform.json``'s description)."""
    logs = Path(described["state_dir"]) / "logs"
    lines = [f"NATS        {described['nats_url']}   (credentials: `torchrelay env`)"]
    if described.get("nats_note"):
        lines.append(f"            {described['nats_note']}")
    for name, service in described["services"].items():
        lines.append(f"{name:11s} {service['url']}   (log: {logs / f'{name}.log'})")
    lines.append(f"storage     {described['storage_root']}")
    lines.append(f"state       {described['state_dir']}")
    return lines


def running(state_dir: Path) -> dict[str, Any] | None:
    """The platform another process runs from ``state_dir``, if it is alive."""
    try:
        described: dict[str, Any] = json.loads((state_dir / "platform.json").read_text())
        os.kill(int(described["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return described


def start(
    state_dir: Path,
    *,
    nats_url: str | None = None,
    replicas: int = 1,
    timeout_s: float = 90,
) -> Platform:
    if replicas < 1:
        raise ConfigError(f"replicas must be at least 1, not {replicas}")
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "logs").mkdir(exist_ok=True)
    passwords = nats_passwords(state_dir) if nats_url is None else None
    platform = Platform(state_dir, nats_url or "", passwords=passwords)
    try:
        if passwords is not None:
            nats = platform.nats = start_nats(state_dir, passwords)
            platform.nats_url = nats.url
            platform.nats_note = nats_note(nats.port or 0)
        for name in SERVICES:
            for index in range(replicas):
                platform.replicas.append(Replica(name, index, _spawn(platform, name, index)))
        deadline = time.monotonic() + timeout_s
        for replica in platform.replicas:
            replica.port = _wait_ready(platform, replica, deadline)
    except BaseException:
        stop(platform)
        raise
    platform.save()
    return platform


def service_env(
    service: str, passwords: dict[str, str] | None, inherited: dict[str, str]
) -> dict[str, str]:
    """A service's environment: its own NATS user (never credentials inherited from the
    shell), and for train the user its workers report with."""
    if passwords is None:
        return dict(inherited)
    env = {k: v for k, v in inherited.items() if not k.startswith("TORCHRELAY_NATS_")}
    env |= {
        "TORCHRELAY_NATS_USER": service,
        "TORCHRELAY_NATS_PASSWORD": passwords[service],
        "TORCHRELAY_NATS_INBOX_PREFIX": principals.inbox_prefix(service),
    }
    if service == "train":
        env |= {
            "TORCHRELAY_TRAIN_WORKER_NATS_USER": principals.WORKER,
            "TORCHRELAY_TRAIN_WORKER_NATS_PASSWORD": passwords[principals.WORKER],
        }
    return env


def _spawn(platform: Platform, service: str, index: int) -> subprocess.Popen[bytes]:
    env = service_env(service, platform.passwords, dict(os.environ))
    env["TORCHRELAY_STORAGE_ROOT"] = str(platform.storage_root.resolve())
    with platform.log_path(f"{service}-{index}").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "torchrelay", "service", service,
             "--nats-url", platform.nats_url, "--http-port", "0"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )  # fmt: skip


def _wait_ready(platform: Platform, replica: Replica, deadline: float) -> int:
    """The replica's HTTP port, once its log says it is ready."""
    while time.monotonic() < deadline:
        port = _ready_port(platform, replica)
        if port is not None:
            return port
        if replica.process.poll() is not None:
            raise ConfigError(f"the {replica.name} service exited: {_log_tail(platform, replica)}")
        time.sleep(0.1)
    log = platform.log_path(replica.name)
    raise ConfigError(f"the {replica.name} service was not ready in time (see {log})")


def _ready_port(platform: Platform, replica: Replica) -> int | None:
    """The replica's HTTP port if its log says this start is ready (this start's line, not an
    earlier run's: the log is appended to across restarts), else None."""
    for line in platform.log_path(replica.name).read_text(errors="replace").splitlines():
        if '"service.ready"' in line:
            ready = json.loads(line)
            if ready.get("pid") == replica.process.pid:
                return int(ready["http_port"])
    return None


def _log_tail(platform: Platform, replica: Replica) -> str:
    return " | ".join(platform.log_path(replica.name).read_text(errors="replace").splitlines()[-5:])


def supervise(platform: Platform, *, say: Callable[[str], None]) -> None:
    """One round: start again what died, when its pause is over (call it every half second).
    Never waits on a process: a replica started again is looked at in the next rounds, so a
    dead nats-server (which the services wait for) is started again on time whatever the
    services do meanwhile."""
    now = time.monotonic()
    _supervise_nats(platform, now, say)
    for replica in platform.replicas:
        code = replica.process.poll()
        if code is not None and replica.due is None:
            steady = now - replica.started >= STEADY_AFTER_S
            replica.restarts = 0 if steady else replica.restarts + 1
            pause = RESTART_PAUSES_S[min(replica.restarts, len(RESTART_PAUSES_S) - 1)]
            # One that died before it was ready says why (its log's last lines).
            why = f": {_log_tail(platform, replica)}" if replica.starting else ""
            replica.due, replica.starting = now + pause, False
            say(f"{replica.name} exited ({code}); starting it again in {pause:g}s{why}")
        if replica.due is not None and now >= replica.due:
            replica.process = _spawn(platform, replica.service, replica.index)
            replica.started, replica.due, replica.starting = now, None, True
        if replica.starting and (port := _ready_port(platform, replica)) is not None:
            replica.port, replica.starting = port, False
            say(f"{replica.name} is back: http://127.0.0.1:{replica.port}")
            platform.save()


def _supervise_nats(platform: Platform, now: float, say: Callable[[str], None]) -> None:
    nats = platform.nats
    if nats is None:
        return  # the user's own NATS: not ours to start
    code = nats.exited()
    if code is not None and platform.nats_due is None:
        pause = RESTART_PAUSES_S[min(platform.nats_restarts, len(RESTART_PAUSES_S) - 1)]
        platform.nats_due = now + pause
        say(f"nats-server exited ({code}); starting it again in {pause:g}s on the same store")
    if platform.nats_due is not None and now >= platform.nats_due:
        platform.nats_due = None
        try:
            nats.restart()
        except ConfigError as exc:
            platform.nats_restarts += 1
            pause = RESTART_PAUSES_S[min(platform.nats_restarts, len(RESTART_PAUSES_S) - 1)]
            platform.nats_due = now + pause
            say(f"nats-server did not start again ({exc}); trying again in {pause:g}s")
            return
        platform.nats_restarts = 0
        say(f"nats-server is back: {nats.url}")
        platform.save()  # its new pid


def stop(platform: Platform, timeout_s: float = 30) -> None:
    """SIGTERM every service (they stop what they started), then the NATS server."""
    for replica in platform.replicas:
        if replica.process.poll() is None:
            replica.process.send_signal(signal.SIGTERM)
    for replica in platform.replicas:
        try:
            replica.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            replica.process.kill()
            replica.process.wait()
    if platform.nats is not None:
        platform.nats.stop()
    with contextlib.suppress(FileNotFoundError):
        (platform.state_dir / "platform.json").unlink()


def up_log(state_dir: Path) -> Path:
    return state_dir / "logs" / UP_LOG


def start_detached(
    state_dir: Path,
    *,
    nats_url: str | None = None,
    replicas: int = 1,
    timeout_s: float = 120,
) -> dict[str, Any]:
    """``torchrelay up`` as a process of its own, in a session of its own (it outlives this
    process and the terminal), its output appended to ``<state>/logs/up.log``. Returns its
    description once every service is ready. Raises ConfigError with the log's last lines when
    it exits first, or when it is not ready in ``timeout_s`` (and a margin for NATS): then it
    is stopped first, and nothing is left running."""
    state_dir = state_dir.resolve()
    log = up_log(state_dir)
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "torchrelay", "up", "--state-dir", str(state_dir),
            "--replicas", str(replicas), "--timeout", str(timeout_s)]  # fmt: skip
    if nats_url is not None:
        argv += ["--nats-url", nats_url]
    with log.open("ab") as output:
        offset = output.tell()
        supervisor = subprocess.Popen(
            argv, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + timeout_s + 30
    try:
        while True:
            described = running(state_dir)
            if described is not None and described.get("pid") == supervisor.pid:
                return described
            code = supervisor.poll()
            if code is not None:
                why = f"`torchrelay up` exited ({code}) before it was ready"
                break
            if time.monotonic() >= deadline:
                _end(supervisor)
                why = f"the platform was not ready in {timeout_s:g}s, so it was stopped"
                break
            time.sleep(0.1)
    except BaseException:
        _end(supervisor)
        raise
    raise ConfigError(f"{why}; the end of {log}:\n{_tail(log, offset)}")


def _end(supervisor: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """Stop a detached ``up`` (it stops what it started); its whole process group if it
    does not."""
    if supervisor.poll() is None:
        supervisor.send_signal(signal.SIGTERM)
    try:
        supervisor.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(supervisor.pid, signal.SIGKILL)
        supervisor.wait()


def _tail(log: Path, offset: int, lines: int = 15) -> str:
    """The last lines this start wrote to ``log`` (written from ``offset`` on)."""
    with log.open("rb") as written:
        written.seek(offset)
        text = written.read().decode(errors="replace")
    return "\n".join(f"  {line}" for line in text.splitlines()[-lines:]) or "  (nothing)"


def stop_running(state_dir: Path, pid: int, timeout_s: float = 60) -> None:
    """SIGTERM the supervisor ``pid`` of the platform running from ``state_dir`` (``up``,
    detached or not) and wait until it has stopped everything: its ``platform.json`` is gone.
    Raises ConfigError when it is still stopping after ``timeout_s``, or when it ended without
    cleaning up."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    description = state_dir / "platform.json"
    deadline = time.monotonic() + timeout_s
    while description.exists():
        if not _alive(pid) and description.exists():
            raise ConfigError(
                f"the platform's supervisor (pid {pid}) ended without stopping its services: "
                f"{description} is stale (its pids may still run)"
            )
        if time.monotonic() >= deadline:
            raise ConfigError(
                f"the platform (pid {pid}) is still stopping after {timeout_s:g}s: "
                f"see {up_log(state_dir)}"
            )
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class LocalPlatform:
    """The local platform a notebook or script works with, from :func:`find_or_start`: one
    that was running already (``started`` False: never stopped from here), or one started for
    this process (stopped by :meth:`close`, at the latest when the process exits). Also a
    context manager that closes it."""

    state_dir: Path
    described: dict[str, Any]
    """``platform.json``'s description: the NATS URL, the services' URLs and pids, storage."""
    platform: Platform | None = None
    """The platform this process started, until :meth:`close` stops it."""

    @property
    def started(self) -> bool:
        """Whether this process started the platform (and still runs it)."""
        return self.platform is not None

    @property
    def nats_url(self) -> str:
        """The URL a :class:`~torchrelay.client.Client` connects to, with the admin's
        credentials when the platform runs with authorization."""
        return client_url(self.state_dir, str(self.described["nats_url"]))

    @property
    def storage_root(self) -> Path:
        """Where datasets, runs (their history too) and models lie."""
        return Path(self.described["storage_root"])

    def close(self) -> None:
        """Stop the platform if this process started it; idempotent. A platform that was
        found running is left running."""
        started, self.platform = self.platform, None
        if started is not None:
            _started_here[:] = [other for other in _started_here if other is not started]
            stop(started)

    def __enter__(self) -> LocalPlatform:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_started_here: list[Platform] = []
"""Platforms :func:`find_or_start` started and nobody closed yet: stopped at exit."""


def _stop_started_here() -> None:
    """Stop what :func:`find_or_start` started and was not closed (an interpreter, or a
    notebook's kernel, that ends first: its services must not outlive it)."""
    while _started_here:
        stop(_started_here.pop())


def find_or_start(state_dir: Path | None = None, *, timeout_s: float = 90) -> LocalPlatform:
    """The platform running from ``state_dir`` (found as every command finds it, see
    :func:`resolve_state_dir`: ``$TORCHRELAY_STATE_DIR`` is honoured), else one started here
    with its own NATS. Raises :class:`ConfigError` when a service does not get ready within
    ``timeout_s``; what was started is stopped again first.

    ::

        with find_or_start() as local:
            client = await Client.connect(local.nats_url)
    """
    state_dir = resolve_state_dir(state_dir)
    described = running(state_dir)
    if described is not None:
        return LocalPlatform(state_dir, described)
    started = start(state_dir, timeout_s=timeout_s)
    _started_here.append(started)
    atexit.unregister(_stop_started_here)  # registered once, however many were started
    atexit.register(_stop_started_here)
    return LocalPlatform(state_dir, started.describe(), started)
