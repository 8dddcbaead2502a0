"""The local platform as a user runs it: `torchrelay` commands in a fresh folder."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import DeliverPolicy

from torchrelay.platform import client_url

ROOT = Path(__file__).parents[2]


def state_env(folder: Path) -> dict[str, str]:
    """The environment of a command run in ``folder``: its platform's state in
    ``folder/.torchrelay`` (each test its own platform), nowhere in the user's home."""
    return {**os.environ, "TORCHRELAY_STATE_DIR": str(folder / ".torchrelay")}


def torchrelay(*argv: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "torchrelay", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**state_env(cwd), "PYTHONPATH": str(ROOT)},
    )


@dataclass
class Up:
    """A running `torchrelay up`."""

    folder: Path
    process: subprocess.Popen[str]
    killed: set[str] = field(default_factory=set)
    """Replicas a test killed: `up` must have started each again."""

    @property
    def described(self) -> dict[str, Any]:
        described: dict[str, Any] = json.loads(
            (self.folder / ".torchrelay" / "platform.json").read_text()
        )
        return described

    @property
    def storage(self) -> Path:
        return Path(self.described["storage_root"])

    def pid(self, replica: str) -> int:
        return int(self.described["services"][replica]["pid"])

    def submit(self, spec: dict[str, Any]) -> str:
        path = self.folder / f"{spec['name']}.json"
        path.write_text(json.dumps(spec))
        submitted = torchrelay("submit", path.name, cwd=self.folder)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        return re.search(r"submitted (\S+)", submitted.stdout)[1]  # type: ignore[index]

    def status(self, pipeline_id: str) -> dict[str, Any]:
        shown = torchrelay("status", pipeline_id, "--json", cwd=self.folder)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        report: dict[str, Any] = json.loads(shown.stdout)
        return report

    def wait_for(self, pipeline_id: str, stage: str, status: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.status(pipeline_id)["stages"][stage]["status"] != status:
            assert time.monotonic() < deadline, f"{stage} never became {status}"
            time.sleep(0.2)

    def finish(self, pipeline_id: str, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (report := self.status(pipeline_id))["status"] == "running":
            assert time.monotonic() < deadline, f"{pipeline_id} did not finish: {report}"
            time.sleep(1)
        return report

    def events(self) -> Counter[tuple[str, str | None]]:
        """How many events of each (type, pipeline) the stream holds."""
        url = client_url(self.folder / ".torchrelay", str(self.described["nats_url"]))
        return asyncio.run(_count_events(url))


async def _count_events(url: str) -> Counter[tuple[str, str | None]]:
    nc = await nats.connect(url)
    try:
        events = await stream_events(nc)
    finally:
        await nc.close()
    return Counter((event["type"], event.get("pipelineid")) for _, event in events)


async def stream_events(nc: Client) -> list[tuple[int, dict[str, Any]]]:
    """Every event the stream holds, in order, with its stream sequence."""
    subscription = await nc.jetstream().subscribe(
        "torchrelay.>", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    events = []
    try:
        while True:
            try:
                message = await subscription.next_msg(timeout=1)
            except TimeoutError:
                break
            events.append((message.metadata.sequence.stream, json.loads(message.data)))
    finally:
        await subscription.unsubscribe()
    return events


def start_up(folder: Path, *argv: str, env: Mapping[str, str] | None = None) -> Up:
    """`torchrelay up` in ``folder``; ``env`` adds to (or overrides) the inherited environment,
    which `up` passes on to its services."""
    process = subprocess.Popen(
        [sys.executable, "-m", "torchrelay", "up", *argv],
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**state_env(folder), **(env or {}), "PYTHONPATH": str(ROOT)},
    )
    deadline = time.monotonic() + 120
    while not (folder / ".torchrelay" / "platform.json").exists():
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        assert time.monotonic() < deadline, "the platform did not start"
        time.sleep(0.2)
    return Up(folder, process)


def stop_up(up: Up) -> str:
    up.process.send_signal(signal.SIGINT)
    output, _ = up.process.communicate(timeout=60)
    assert up.process.returncode == 0, output
    assert "stopping" in output
    assert not (up.folder / ".torchrelay" / "platform.json").exists()
    # Every principal (each service, the workers, the command line) had the permissions it
    # needed: nats-server logs each refused publish or subscription.
    nats_log = (up.folder / ".torchrelay" / "nats" / "nats-server.log").read_text()
    assert "Violation" not in nats_log, [x for x in nats_log.splitlines() if "Violation" in x]
    return output


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Up]:
    up = start_up(tmp_path)
    yield up
    stop_up(up)


def digits_pipeline(
    name: str, *, epochs: int = 20, world_size: int = 2, model_name: str = "digits"
) -> dict[str, Any]:
    return {
        "name": name,
        "dataset": {"name": "digits", "source": "sklearn:digits"},
        "training": {
            "entrypoint": "torchrelay.services.train.examples.digits:train",
            "model_name": model_name,
            "world_size": world_size,
            "checkpoint_every_steps": 20,
            "hyperparameters": {"epochs": epochs},
        },
        "deploy": {"enabled": True, "replicas": 1},
    }
