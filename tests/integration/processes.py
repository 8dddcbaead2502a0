"""Run a service as a real child process and read what it logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torchrelay.shared.testing import assert_eventually


class ServiceProcess:
    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, *argv],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
        self.http_port: int | None = None

    def records(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text().splitlines():
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return found

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("event") == event]

    async def wait_ready(self, timeout_s: float = 30) -> int:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"service exited early:\n{self.log_path.read_text()[-3000:]}")
            return bool(self.logged("service.ready"))

        await assert_eventually(
            ready, timeout_s=timeout_s, message=lambda: self.log_path.read_text()[-3000:]
        )
        record = self.logged("service.ready")[0]
        self.http_port = int(record["http_port"])
        return self.http_port

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout_s: float = 30) -> int:
        try:
            return self.process.wait(timeout_s)
        finally:
            self._log.close()

    def stop(self) -> None:
        """Make sure the process is gone (test cleanup): SIGTERM, so it can stop what it
        started, then SIGKILL."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait()
        self._log.close()

    def elapsed_wait(self, timeout_s: float) -> tuple[int, float]:
        started = time.monotonic()
        code = self.wait(timeout_s)
        return code, time.monotonic() - started


def cli(
    *argv: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 60,
) -> subprocess.CompletedProcess[str]:
    """``torchrelay ARGV`` as a person runs it: a process of its own, its output captured,
    whatever its exit code (``env``: the whole environment, else this one)."""
    return subprocess.run(
        [sys.executable, "-m", "torchrelay", *argv],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        cwd=cwd,
        env=None if env is None else dict(env),
    )


def serve_service(nats_url: str, storage: Path, log: Path, *, drain_s: float) -> ServiceProcess:
    """The serve service as a real process on ``storage``: two model servers per rollout, and
    quick drains and shutdowns so that tests do not wait."""
    return ServiceProcess(
        ["-m", "torchrelay", "service", "serve", "--nats-url", nats_url, "--http-port", "0"],
        log,
        env={
            "TORCHRELAY_STORAGE_ROOT": str(storage),
            "TORCHRELAY_SERVE_REPLICAS": "2",
            "TORCHRELAY_SERVE_DRAIN_S": f"{drain_s:g}",
            "TORCHRELAY_SHUTDOWN_GRACE_S": "5",
            "TORCHRELAY_SHUTDOWN_DEADLINE_S": "15",
        },
    )
