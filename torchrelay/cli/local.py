"""The platform on this machine: ``up``, ``down``, ``env``, ``demo``, and ``service`` (one
service, as the containers run it)."""

from __future__ import annotations

import importlib
import shlex
import signal
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from torchrelay.cli.base import (
    EXIT_USAGE,
    NatsUrl,
    Refusal,
    StateDir,
    Timeout,
    say,
    state_dir,
)

# Services import lazily: `torchrelay service monitor` never imports torch.
SERVICES = {
    "ingest": "torchrelay.services.ingest.service",
    "monitor": "torchrelay.services.monitor.service",
    "serve": "torchrelay.services.serve.service",
    "train": "torchrelay.services.train.service",
}
Service = StrEnum("Service", {name: name for name in SERVICES})  # type: ignore[misc]


def service(
    context: typer.Context,
    name: Annotated[Service, typer.Argument(help="The service to run.", show_default=False)],
) -> int:
    """Run one service in the foreground (what a container runs); its own options follow."""
    module = importlib.import_module(SERVICES[str(name)])
    result: int = module.main(list(context.args))
    return result


def up(
    *,
    state: StateDir = None,
    nats_url: NatsUrl = None,
    replicas: Annotated[int, typer.Option("--replicas", min=1, help="Processes per service.")] = 1,
    detach: Annotated[
        bool,
        typer.Option(
            "--detach",
            help="Run in the background and return once every service is ready "
            "(`torchrelay down` stops it; its output: <state>/logs/up.log).",
        ),
    ] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to be ready in.")] = 120,
) -> int:
    """Run NATS and the four services here (NATS on 4222 when it is free)."""
    from torchrelay import platform
    from torchrelay.shared.errors import ConfigError

    folder = state_dir(state)
    if platform.running(folder) is not None:
        raise Refusal(f"a platform already runs from {folder}", EXIT_USAGE)
    begun = time.monotonic()
    if detach:
        try:
            described = platform.start_detached(
                folder, nats_url=nats_url, replicas=replicas, timeout_s=timeout
            )
        except ConfigError as exc:
            raise Refusal(str(exc)) from None
        say("\n".join(platform.summary(described)))
        log = platform.up_log(Path(described["state_dir"]))
        say(
            f"ready in {time.monotonic() - begun:.1f}s, running in the background "
            f"(pid {described['pid']}, log: {log}); `{down_command(folder)}` stops it"
        )
        return 0
    # SIGTERM (`torchrelay down`) while it starts: KeyboardInterrupt, and start stops what it
    # started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        started = platform.start(folder, nats_url=nats_url, replicas=replicas, timeout_s=timeout)
    except ConfigError as exc:
        raise Refusal(str(exc)) from None
    except KeyboardInterrupt:
        raise Refusal("stopped before it was ready") from None
    say("\n".join(platform.summary(started.describe())))
    say(
        f"ready in {time.monotonic() - begun:.1f}s. A service that dies is started again. "
        f"Ctrl-C (or `{down_command(folder)}`) stops everything."
    )
    stop = {"requested": False}

    def request_stop(signum: int, frame: object) -> None:
        stop["requested"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        while not stop["requested"]:
            platform.supervise(started, say=say)
            time.sleep(0.5)  # a signal runs the handler, then the loop sees the flag
    finally:
        say("stopping...")
        platform.stop(started)
    return 0


def down_command(folder: Path) -> str:
    """The `torchrelay down` that finds the platform of ``folder`` (from any folder)."""
    from torchrelay import platform

    if folder == platform.resolve_state_dir(None):
        return "torchrelay down"
    return f"torchrelay down --state-dir {shlex.quote(str(folder.absolute()))}"


def down(*, state: StateDir = None, timeout: Timeout = 60) -> int:
    """Stop the platform `up` runs from the state folder (detached or not)."""
    from torchrelay import platform
    from torchrelay.shared.errors import ConfigError

    folder = state_dir(state)
    described = platform.running(folder)
    if described is None:
        raise Refusal(f"no platform runs from {folder}")
    try:
        platform.stop_running(folder, int(described["pid"]), timeout_s=timeout)
    except ConfigError as exc:
        raise Refusal(str(exc)) from None
    say(f"stopped the platform that ran from {folder}")
    return 0


def env(*, state: StateDir = None) -> int:
    """Print `export` lines: the platform's NATS URLs (with credentials) and storage."""
    from torchrelay import platform
    from torchrelay.shared.bus import principals

    folder = state_dir(state)
    described = platform.running(folder)
    if described is None:
        raise Refusal(f"no platform runs from {folder}: start one with `torchrelay up`", EXIT_USAGE)
    url = str(described["nats_url"])
    lines = {
        # The operator's own user (the command line): everything, replay included.
        "TORCHRELAY_NATS_URL": platform.client_url(folder, url),
        # For other systems: may publish requests (pipeline.submitted, *.requested) and read
        # facts, nothing else.
        "TORCHRELAY_PUBLISHER_URL": platform.client_url(folder, url, principals.PUBLISHER),
        "TORCHRELAY_STORAGE_ROOT": str(described["storage_root"]),
        # Later commands in this shell find this platform from any folder.
        "TORCHRELAY_STATE_DIR": str(folder.absolute()),
    }
    for name, value in lines.items():
        say(f"export {name}={shlex.quote(value)}")
    return 0


def demo(*, state: StateDir = None, timeout: Timeout = 600) -> int:
    """Run the digits demo: stage, train, deploy, predict (on a platform of its own if none runs).

    A platform it started is stopped at the end; `torchrelay up` keeps one running."""
    import asyncio

    import numpy as np

    from torchrelay import platform
    from torchrelay.cli.progress import report_for_terminal
    from torchrelay.client import DEMO, Client, predict
    from torchrelay.shared.events.data import PipelineSpec
    from torchrelay.shared.storage.layout import Layout

    folder = state_dir(state)
    if platform.running(folder) is None:
        say("starting the platform (NATS and four services)...")
    local = platform.find_or_start(folder)

    async def run() -> int:
        client = await Client.connect(local.nats_url)
        try:
            spec = PipelineSpec.model_validate(DEMO)
            pipeline_id = await client.submit(spec)
            say(f"pipeline {pipeline_id}: stage sklearn:digits, train (2 ranks), deploy")
            with report_for_terminal(spec) as report:
                record = await client.wait(pipeline_id, timeout_s=timeout, report=report)
            if record.status != "succeeded":
                say(f"the demo pipeline {record.status}; see `torchrelay status {pipeline_id}`")
                return 1
            endpoint = str(record.stages["deploy"].detail["endpoint"])
            dataset = record.stages["ingest"].detail
            data_file = (
                Layout(local.storage_root).dataset_data(
                    str(dataset["dataset"]), str(dataset["version"])
                )
                / "digits.npz"
            )
            with np.load(data_file, allow_pickle=False) as arrays:
                image, label = arrays["x"][7:8] / 16.0, int(arrays["y"][7])
            answer = await predict(endpoint, image[:, None, :, :])
            scores = answer["outputs"][0]["data"]
            accuracy = record.stages["train"].detail.get("metrics", {})
            say(f"\nendpoint   {endpoint}")
            say(f"accuracy   {accuracy}")
            say(f"prediction digit {int(np.argmax(scores))} for an image of a {label}")
            overhead = record.overhead_s()
            if overhead is not None:
                say(f"platform overhead between stages: {overhead:.2f}s")
            return 0
        finally:
            await client.aclose()

    try:
        return asyncio.run(run())
    finally:
        if local.started:
            say("stopping the platform the demo started (`torchrelay up` keeps one running)")
            local.close()
