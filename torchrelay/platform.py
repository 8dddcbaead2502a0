"""The local platform: a real nats-server and the four services as processes on loopback.

``torchrelay up`` runs it in the foreground; ``torchrelay demo`` starts one if none is
running. The running platform is described in ``<state>/platform.json`` for the other commands.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchrelay.shared.bus.server import NatsServer
from torchrelay.shared.errors import ConfigError

SERVICES = ("ingest", "train", "serve", "monitor")
DEFAULT_STATE = Path(".torchrelay")


@dataclass
class Platform:
    state_dir: Path
    nats_url: str
    nats: NatsServer | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def storage_root(self) -> Path:
        return self.state_dir / "storage"

    def describe(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "nats_url": self.nats_url,
            "storage_root": str(self.storage_root.resolve()),
            "services": {name: f"http://127.0.0.1:{port}" for name, port in self.ports.items()},
        }


def running(state_dir: Path) -> dict[str, Any] | None:
    """The platform another process runs from ``state_dir``, if it is alive."""
    try:
        described: dict[str, Any] = json.loads((state_dir / "platform.json").read_text())
        os.kill(int(described["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return described


def start(state_dir: Path, *, nats_url: str | None = None, timeout_s: float = 90) -> Platform:
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "logs").mkdir(exist_ok=True)
    nats = None
    if nats_url is None:
        nats = NatsServer(state_dir / "nats").start()
        nats_url = nats.url
    platform = Platform(state_dir, nats_url, nats)
    env = {**os.environ, "TORCHRELAY_STORAGE_ROOT": str(platform.storage_root.resolve())}
    try:
        for name in SERVICES:
            log = (state_dir / "logs" / f"{name}.log").open("wb")
            platform.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "torchrelay", "service", name,
                 "--nats-url", nats_url, "--http-port", "0"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip
            log.close()
        deadline = time.monotonic() + timeout_s
        for name in SERVICES:
            platform.ports[name] = _wait_ready(platform, name, deadline)
    except BaseException:
        stop(platform)
        raise
    (state_dir / "platform.json").write_text(json.dumps(platform.describe(), indent=2))
    return platform


def _wait_ready(platform: Platform, name: str, deadline: float) -> int:
    log = platform.state_dir / "logs" / f"{name}.log"
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if '"service.ready"' in line:
                return int(json.loads(line)["http_port"])
        if platform.processes[name].poll() is not None:
            tail = " | ".join(log.read_text(errors="replace").splitlines()[-5:])
            raise ConfigError(f"the {name} service exited: {tail}")
        time.sleep(0.1)
    raise ConfigError(f"the {name} service was not ready in time (see {log})")


def stop(platform: Platform, timeout_s: float = 30) -> None:
    """SIGTERM every service (they stop what they started), then the NATS server."""
    for process in platform.processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in platform.processes.values():
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if platform.nats is not None:
        platform.nats.stop()
    with contextlib.suppress(FileNotFoundError):
        (platform.state_dir / "platform.json").unlink()
