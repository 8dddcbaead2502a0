"""The ``torchrelay`` command."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchrelay import __version__

# Services import lazily: `torchrelay service monitor` never imports torch.
SERVICES = {
    "ingest": "torchrelay.services.ingest.service",
    "monitor": "torchrelay.services.monitor.service",
    "serve": "torchrelay.services.serve.service",
    "train": "torchrelay.services.train.service",
}
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
"""128 + SIGINT, as shells report a command Ctrl-C stopped."""
EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE, as a command that wrote to a closed pipe reports it."""
STATE_DIR_HELP = (
    "the platform's state folder (default: $TORCHRELAY_STATE_DIR, else "
    "$XDG_STATE_HOME/torchrelay, else ~/.local/state/torchrelay)"
)


def _schema_export(directory: Path) -> int:
    from torchrelay.shared.events.data import PipelineSpec
    from torchrelay.shared.events.schema import (
        all_json_schemas,
        asyncapi_document,
        schema_file_name,
    )

    directory.mkdir(parents=True, exist_ok=True)
    schemas = all_json_schemas()
    for event_type, schema in schemas.items():
        (directory / schema_file_name(event_type)).write_text(json.dumps(schema, indent=2) + "\n")
    (directory / "asyncapi.json").write_text(json.dumps(asyncapi_document(), indent=2) + "\n")
    pipeline = PipelineSpec.model_json_schema()
    (directory / "pipeline.schema.json").write_text(json.dumps(pipeline, indent=2) + "\n")
    print(
        f"wrote {len(schemas)} event schemas, asyncapi.json and pipeline.schema.json to {directory}"
    )
    return 0


def _service(name: str, argv: Sequence[str]) -> int:
    module = importlib.import_module(SERVICES[name])
    result: int = module.main(list(argv))
    return result


def _nats_url(args: argparse.Namespace) -> str:
    from torchrelay import platform

    if args.nats_url or os.environ.get("TORCHRELAY_NATS_URL"):
        return str(args.nats_url or os.environ["TORCHRELAY_NATS_URL"])
    described = platform.running(args.state_dir)
    if described is None:
        print(
            f"torchrelay: no platform runs from {args.state_dir}: start one with `torchrelay up` "
            "or pass --nats-url",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_USAGE)
    return platform.client_url(args.state_dir, str(described["nats_url"]))


def _env(args: argparse.Namespace) -> int:
    """``export`` lines for shells and other systems: where NATS is, as whom to connect."""
    import shlex

    from torchrelay import platform
    from torchrelay.shared.bus import principals

    described = platform.running(args.state_dir)
    if described is None:
        print(
            f"torchrelay: no platform runs from {args.state_dir}: start one with `torchrelay up`",
            file=sys.stderr,
        )
        return EXIT_USAGE
    url = str(described["nats_url"])
    lines = {
        # The operator's own user (the command line): everything, replay included.
        "TORCHRELAY_NATS_URL": platform.client_url(args.state_dir, url),
        # For other systems: may publish requests (pipeline.submitted, *.requested) and read
        # facts, nothing else.
        "TORCHRELAY_PUBLISHER_URL": platform.client_url(args.state_dir, url, principals.PUBLISHER),
        "TORCHRELAY_STORAGE_ROOT": str(described["storage_root"]),
        # Later commands in this shell find this platform from any folder.
        "TORCHRELAY_STATE_DIR": str(args.state_dir.absolute()),
    }
    for name, value in lines.items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


def _up(args: argparse.Namespace) -> int:
    import signal
    import time

    from torchrelay import platform
    from torchrelay.shared.errors import ConfigError

    if platform.running(args.state_dir) is not None:
        print(f"torchrelay: a platform already runs from {args.state_dir}", file=sys.stderr)
        return EXIT_USAGE
    begun = time.monotonic()
    if args.detach:
        try:
            described = platform.start_detached(
                args.state_dir,
                nats_url=args.nats_url,
                replicas=args.replicas,
                timeout_s=args.timeout,
            )
        except ConfigError as exc:
            print(f"torchrelay: {exc}", file=sys.stderr)
            return 1
        print("\n".join(platform.summary(described)))
        log = platform.up_log(Path(described["state_dir"]))
        print(
            f"ready in {time.monotonic() - begun:.1f}s, running in the background "
            f"(pid {described['pid']}, log: {log}); `{_down_command(args.state_dir)}` stops it"
        )
        return 0
    # SIGTERM (`torchrelay down`) while it starts: KeyboardInterrupt, and start stops what it
    # started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        started = platform.start(
            args.state_dir, nats_url=args.nats_url, replicas=args.replicas, timeout_s=args.timeout
        )
    except ConfigError as exc:
        print(f"torchrelay: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("torchrelay: stopped before it was ready", file=sys.stderr)
        return 1
    print("\n".join(platform.summary(started.describe())))
    print(
        f"ready in {time.monotonic() - begun:.1f}s. A service that dies is started again. "
        f"Ctrl-C (or `{_down_command(args.state_dir)}`) stops everything.",
        flush=True,
    )
    stop = {"requested": False}

    def request_stop(signum: int, frame: object) -> None:
        stop["requested"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        while not stop["requested"]:
            platform.supervise(started, say=lambda line: print(line, flush=True))
            time.sleep(0.5)  # a signal runs the handler, then the loop sees the flag
    finally:
        print("stopping...", flush=True)
        platform.stop(started)
    return 0


def _down_command(state_dir: Path) -> str:
    """The `torchrelay down` that finds the platform of ``state_dir`` (from any folder)."""
    import shlex

    from torchrelay import platform

    if state_dir == platform.resolve_state_dir(None):
        return "torchrelay down"
    return f"torchrelay down --state-dir {shlex.quote(str(state_dir.absolute()))}"


def _down(args: argparse.Namespace) -> int:
    """Stop the platform that runs from the state folder (`up`, detached or not)."""
    from torchrelay import platform
    from torchrelay.shared.errors import ConfigError

    described = platform.running(args.state_dir)
    if described is None:
        print(f"torchrelay: no platform runs from {args.state_dir}", file=sys.stderr)
        return 1
    try:
        platform.stop_running(args.state_dir, int(described["pid"]), timeout_s=args.timeout)
    except ConfigError as exc:
        print(f"torchrelay: {exc}", file=sys.stderr)
        return 1
    print(f"stopped the platform that ran from {args.state_dir}")
    return 0


def _submit(args: argparse.Namespace) -> int:
    import asyncio

    from torchrelay import specfile
    from torchrelay.client import Client

    following: dict[str, str] = {}

    async def run() -> int:
        try:
            spec = await specfile.prepare(
                args.file, lambda: _uploader(args), lambda line: print(line, flush=True)
            )
        except specfile.SpecError as exc:
            print(f"torchrelay: {exc}", file=sys.stderr)
            return EXIT_USAGE
        client = await Client.connect(_nats_url(args))
        try:
            pipeline_id = await client.submit(spec)
            following["id"] = pipeline_id
            print(f"submitted {pipeline_id}", flush=True)
            if not args.wait:
                return 0
            return await _follow(client, pipeline_id, args.timeout)
        finally:
            await client.aclose()

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return _let_go(following["id"]) if args.wait and "id" in following else EXIT_INTERRUPTED


async def _follow(client: Any, pipeline_id: str, timeout_s: float) -> int:
    """Follow a pipeline to its end: 0 when it succeeded, else 1 saying why."""
    from torchrelay.client import PipelineRefused, failure_report, train_run_id

    try:
        record = await client.wait(pipeline_id, timeout_s=timeout_s)
    except PipelineRefused as exc:
        print(f"torchrelay: pipeline {pipeline_id} refused: {exc.reason}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(
            f"torchrelay: {pipeline_id} is still running after {timeout_s:g}s; it goes on: "
            f"`torchrelay status {pipeline_id} --follow` follows it again",
            file=sys.stderr,
        )
        return 1
    print(f"{pipeline_id}: {record.status}")
    if record.status == "succeeded":
        return 0
    run = await client.run(train_run_id(pipeline_id))
    print("\n".join(failure_report(record, run)), file=sys.stderr)
    return 1


def _let_go(pipeline_id: str) -> int:
    print(
        f"\ntorchrelay: stopped following {pipeline_id}; the pipeline goes on: "
        f"`torchrelay status {pipeline_id} --follow` follows it again",
        file=sys.stderr,
    )
    return EXIT_INTERRUPTED


def _uploader(args: argparse.Namespace) -> Any:
    """Where a spec's local files are uploaded: --ingest-url, $TORCHRELAY_INGEST_URL, or the
    ingest of the platform running from --state-dir."""
    from torchrelay import platform, specfile

    url = args.ingest_url or os.environ.get("TORCHRELAY_INGEST_URL")
    if not url:
        described = platform.running(args.state_dir) or {}
        services = described.get("services", {})
        url = next((s["url"] for n, s in sorted(services.items()) if n.startswith("ingest")), None)
    if not url:
        raise specfile.SpecError(
            "the spec names local files, which are uploaded to ingest: start the platform "
            "(`torchrelay up`) or pass --ingest-url (or set TORCHRELAY_INGEST_URL)"
        )
    return specfile.Uploader(url, token=os.environ.get("TORCHRELAY_INGEST_TOKEN"))


def _status(args: argparse.Namespace) -> int:
    import asyncio

    from torchrelay.client import Client, lineage, table, timing

    async def run() -> int:
        client = await Client.connect(_nats_url(args))
        try:
            if args.id is None:
                rows = (await client.inventory()).rows()
                if args.json:
                    print(json.dumps(rows, indent=2, default=str))
                    return 0
                for kind, listed in rows.items():
                    print(f"{kind.upper()}\n{table(listed)}\n")
                return 0
            record = await client.record(args.id)
            if record is None:
                print(f"torchrelay: no pipeline {args.id}", file=sys.stderr)
                return 1
            if args.follow:
                return await _follow(client, args.id, args.timeout)
            report = timing(record)
            if args.json:
                print(json.dumps(report, indent=2, default=str))
                return 0
            print(f"{report['pipeline_id']} ({report['name']}): {report['status']}")
            linked = lineage(record)
            chain = [f"{k} {linked[k]}" for k in ("dataset", "run", "model", "endpoint")]
            print("  lineage: " + " -> ".join(c for c in chain if not c.endswith(" ")))
            for name, stage in report["stages"].items():
                seconds = "" if stage["seconds"] is None else f"{stage['seconds']:.2f}s"
                note = stage["reason"] or " ".join(
                    f"{k}={v}" for k, v in stage["detail"].items() if not isinstance(v, dict)
                )
                print(f"  {name:7s} {stage['status']:9s} {seconds:>9s}  {note}")
            if report["overhead_seconds"] is not None:
                print(
                    f"  platform overhead (gaps between stages): {report['overhead_seconds']:.2f}s"
                )
            return 0
        finally:
            await client.aclose()

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return _let_go(args.id) if args.follow and args.id else EXIT_INTERRUPTED


def _request(args: argparse.Namespace) -> int:
    """``cancel``, ``deploy`` and ``rollback``: check, then publish the request event."""
    import asyncio

    from torchrelay.client import Client, Refused

    async def run() -> int:
        client = await Client.connect(_nats_url(args))
        try:
            if args.command == "cancel":
                run_id = await client.cancel(args.id, args.reason)
                print(f"cancel of run {run_id} requested; `torchrelay status` shows it end")
            elif args.command == "deploy":
                await client.deploy(args.model, args.version, args.replicas)
                print(
                    f"rollout of {args.model} {args.version} requested; `torchrelay status` "
                    "shows the deployment"
                )
            elif args.command == "rollback":
                await client.rollback(args.model, args.to)
                print(f"rollback of {args.model} requested; `torchrelay status` shows it")
            elif args.command == "undeploy":
                version = await client.undeploy(args.model, args.reason)
                print(
                    f"undeploy of {args.model} ({version} serves) requested; "
                    "`torchrelay status` shows it"
                )
            else:
                pipeline_id = await client.retry(args.id)
                print(f"submitted {pipeline_id} (a retry of {args.id})")
                if args.wait:
                    return await _follow(client, pipeline_id, args.timeout)
        except Refused as exc:
            print(f"torchrelay: {exc}", file=sys.stderr)
            return 1
        finally:
            await client.aclose()
        return 0

    return asyncio.run(run())


def _listing(args: argparse.Namespace) -> int:
    """``models`` and ``datasets``: one table (or JSON)."""
    import asyncio

    from torchrelay.client import Client, table

    async def run() -> list[dict[str, Any]]:
        client = await Client.connect(_nats_url(args))
        try:
            if args.command == "models":
                return (await client.inventory()).rows()["models"]
            return [
                {
                    "dataset": v.name,
                    "version": v.version,
                    "format": v.format,
                    "files": v.files,
                    "bytes": v.size_bytes,
                    "created": v.created.isoformat(timespec="seconds"),
                    "source": v.source,
                }
                for v in await client.datasets()
            ]
        finally:
            await client.aclose()

    rows = asyncio.run(run())
    print(json.dumps(rows, indent=2, default=str) if args.json else table(rows))
    return 0


def _events(args: argparse.Namespace) -> int:
    """The stream's last events, one line each (``--json``: as stored); ``--follow`` goes on."""
    import asyncio

    from torchrelay.client import Client, event_line

    async def run() -> int:
        client = await Client.connect(_nats_url(args))
        try:
            async for event in client.events(
                last=args.last, follow=args.follow, pipeline_id=args.pipeline
            ):
                print(json.dumps(event) if args.json else event_line(event), flush=True)
        finally:
            await client.aclose()
        return 0

    return asyncio.run(run())


def _logs(args: argparse.Namespace) -> int:
    """Every attempt's rank logs of a run, from the platform's storage."""
    from torchrelay import platform
    from torchrelay.shared.errors import UnsafePath
    from torchrelay.shared.storage.layout import RANK_LOG_GLOB, Layout

    described = platform.running(args.state_dir)
    root = Path(described["storage_root"]) if described else args.state_dir / "storage"
    try:
        folder = Layout(root).logs(args.run_id)
    except UnsafePath as exc:
        print(f"torchrelay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs = sorted(folder.glob(RANK_LOG_GLOB))
    if not logs:
        print(f"torchrelay: no logs for run {args.run_id} under {folder}", file=sys.stderr)
        return 1
    from torchrelay.client import render_log_line

    for log in logs:
        print(f"==> {log.parent.name}/{log.name} <==")
        with log.open(errors="replace") as lines:
            for line in lines:
                print(line.rstrip("\n") if args.raw else render_log_line(line))
    return 0


def _tensorboard(args: argparse.Namespace) -> int:
    """TensorBoard over the history the workers wrote: the named runs, else every run that has
    one; on 127.0.0.1 only, until Ctrl-C."""
    import importlib.util
    import signal
    import socket
    import subprocess

    from torchrelay import platform
    from torchrelay.shared.errors import UnsafePath

    described = platform.running(args.state_dir)
    root = Path(described["storage_root"]) if described else args.state_dir / "storage"
    try:
        folders = _histories(root, args.run_ids)
    except UnsafePath as exc:
        print(f"torchrelay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LookupError as exc:
        print(f"torchrelay: {exc.args[0]}", file=sys.stderr)
        return 1
    if any("," in str(folder) for folder in folders.values()):
        print(f"torchrelay: TensorBoard cannot read a path with a comma: {root}", file=sys.stderr)
        return EXIT_USAGE
    if importlib.util.find_spec("tensorboard") is None:
        print(
            "torchrelay: TensorBoard is not installed in this environment: "
            "pip install 'torchrelay[train]'",
            file=sys.stderr,
        )
        return 1
    port = args.port
    if port == 0:  # a free port, chosen here so that the URL can be printed before it starts
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    # --logdir_spec takes name:path pairs; its names cannot hold ":" (run ids may).
    spec = ",".join(f"{name.replace(':', '_')}:{path.absolute()}" for name, path in folders.items())
    argv = [sys.executable, "-m", "tensorboard.main", "--logdir_spec", spec]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    where = f"http://127.0.0.1:{port}/"
    print(f"TensorBoard over {', '.join(folders)}: {where}  (Ctrl-C stops it)", flush=True)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for stop in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a background start ignores it
        signal.signal(stop, interrupt)
    # Same process group: Ctrl-C in a terminal reaches TensorBoard too, and it stops quietly by
    # itself. A signal to this process alone (kill, a supervisor) is passed on as SIGTERM.
    board = subprocess.Popen(argv)
    try:
        return 0 if board.wait() == 0 else 1  # TensorBoard said why (a port in use, ...)
    except KeyboardInterrupt:
        for stop in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C: no traceback either
            signal.signal(stop, signal.SIG_IGN)
        try:
            board.wait(timeout=2)  # it had the terminal's Ctrl-C too
        except subprocess.TimeoutExpired:
            board.terminate()
            try:
                board.wait(timeout=10)
            except subprocess.TimeoutExpired:
                board.kill()
                board.wait()
        return 0


def _histories(root: Path, run_ids: Sequence[str]) -> dict[str, Path]:
    """Run id -> its history folder, for the named runs or (none named) every run with one.
    LookupError (one line) for an unknown run, a run without history, or no history at all;
    UnsafePath for a run id that is not one path segment."""
    from torchrelay.shared.storage.layout import RUNS, Layout

    layout, runs = Layout(root), root / RUNS

    def has_history(folder: Path) -> bool:
        return folder.is_dir() and any(folder.glob("attempt-*/events.out.tfevents.*"))

    if not run_ids:
        found = {
            run.name: layout.history(run.name)
            for run in sorted(runs.iterdir() if runs.is_dir() else [])
            if has_history(layout.history(run.name))
        }
        if not found:
            raise LookupError(
                f"no run history under {runs}: rank 0 of a run writes it as it trains"
            )
        return found
    folders: dict[str, Path] = {}
    for run_id in dict.fromkeys(run_ids):
        folder = layout.history(run_id)
        if not layout.run(run_id).is_dir():
            raise LookupError(f"no run {run_id} under {runs}")
        if not has_history(folder):
            raise LookupError(f"run {run_id} has no history (TensorBoard event files) in {folder}")
        folders[run_id] = folder
    return folders


def _predict(args: argparse.Namespace) -> int:
    import asyncio

    from torchrelay.client import (
        Client,
        InputMismatch,
        decode,
        infer,
        load_input,
        model_info,
        prepare_input,
        scaling_line,
    )

    try:
        sample = load_input(args.file)
    except ValueError as exc:
        print(f"torchrelay: {exc}", file=sys.stderr)
        return EXIT_USAGE

    async def run() -> int:
        client = await Client.connect(_nats_url(args))
        try:
            deployment = await client.deployment(args.model)
        finally:
            await client.aclose()
        if deployment is None or deployment.status != "deployed" or not deployment.endpoint:
            print(f"torchrelay: model {args.model!r} is not deployed", file=sys.stderr)
            return 1
        try:
            info = await model_info(deployment.endpoint)
            batch = prepare_input(sample, info, batched=args.batched, raw=args.raw)
            answer = await infer(deployment.endpoint, info, batch)
        except InputMismatch as exc:
            print(f"torchrelay: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except (RuntimeError, ValueError, OSError) as exc:
            print(f"torchrelay: {exc}", file=sys.stderr)
            return 1
        decoded = decode(answer, info.labels) if info.labels else None
        if decoded is None:  # nothing to name: the answer as the model gave it
            print(json.dumps(answer, indent=2))
        elif args.json:
            print(json.dumps({**answer, **decoded.as_json()}, indent=2))
        else:
            if info.preprocessing is not None and not args.raw:
                print(scaling_line(info.preprocessing))
            print("\n".join(decoded.lines()))
        return 0

    return asyncio.run(run())


def _demo(args: argparse.Namespace) -> int:
    import asyncio

    import numpy as np

    from torchrelay import platform
    from torchrelay.client import DEMO, Client, predict
    from torchrelay.shared.events.data import PipelineSpec
    from torchrelay.shared.storage.layout import Layout

    described = platform.running(args.state_dir)
    started = None
    if described is None:
        print("starting the platform (NATS and four services)...", flush=True)
        started = platform.start(args.state_dir)
        described = started.describe()

    async def run() -> int:
        client = await Client.connect(
            platform.client_url(args.state_dir, str(described["nats_url"]))
        )
        try:
            pipeline_id = await client.submit(PipelineSpec.model_validate(DEMO))
            print(
                f"pipeline {pipeline_id}: stage sklearn:digits, train (2 ranks), deploy", flush=True
            )
            record = await client.wait(pipeline_id, timeout_s=args.timeout)
            if record.status != "succeeded":
                print(f"the demo pipeline {record.status}; see `torchrelay status {pipeline_id}`")
                return 1
            endpoint = str(record.stages["deploy"].detail["endpoint"])
            dataset = record.stages["ingest"].detail
            data_file = (
                Layout(Path(described["storage_root"])).dataset_data(
                    str(dataset["dataset"]), str(dataset["version"])
                )
                / "digits.npz"
            )
            with np.load(data_file, allow_pickle=False) as arrays:
                image, label = arrays["x"][7:8] / 16.0, int(arrays["y"][7])
            answer = await predict(endpoint, image[:, None, :, :])
            scores = answer["outputs"][0]["data"]
            accuracy = record.stages["train"].detail.get("metrics", {})
            print(f"\nendpoint   {endpoint}")
            print(f"accuracy   {accuracy}")
            print(f"prediction digit {int(np.argmax(scores))} for an image of a {label}")
            overhead = record.overhead_s()
            if overhead is not None:
                print(f"platform overhead between stages: {overhead:.2f}s")
            return 0
        finally:
            await client.aclose()

    try:
        return asyncio.run(run())
    finally:
        if started is not None:
            print("stopping the platform the demo started (`torchrelay up` keeps one running)")
            platform.stop(started)


def _deadletters(args: argparse.Namespace) -> int:
    """List the dead letters the stream holds, or replay the original at a stream sequence."""
    import asyncio

    from torchrelay.shared.bus.connection import NatsSettings, connect
    from torchrelay.shared.bus.deadletters import ReplayRefused, listing_row
    from torchrelay.shared.bus.jetstream import JetStreamBus, StreamSettings

    async def run() -> int:
        nc = await connect(NatsSettings(url=_nats_url(args), startup_wait_s=10))
        # No ensure_stream: reading and replaying must not reconfigure the platform's stream.
        bus = JetStreamBus(nc, StreamSettings(name=args.stream), source="/torchrelay/cli")
        try:
            if not await bus.stream_ready():
                print(f"torchrelay: no stream {args.stream} on this NATS", file=sys.stderr)
                return 1
            if args.deadletters_command == "replay":
                try:
                    copy = await bus.replay(args.sequence)
                except ReplayRefused as exc:
                    print(f"torchrelay: {exc}", file=sys.stderr)
                    return 1
                print(f"replayed sequence {args.sequence} as sequence {copy.sequence}")
                return 0
            rows = [listing_row(sequence, letter) for sequence, letter in await bus.dead_letters()]
        finally:
            await bus.aclose()
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(_dead_letter_table(rows))
        return 0

    return asyncio.run(run())


def _dead_letter_table(rows: list[dict[str, object]]) -> str:
    from torchrelay.client import table

    def original(row: dict[str, object]) -> str:
        described = row.get("original_type") or row.get("original_subject") or "?"
        return f"{described} {row.get('original_id') or row.get('original_msg_id') or ''}"

    return table(
        [
            {
                "time": str(row.get("time", ""))[:19],
                "consumer": row.get("consumer", ""),
                "original": original(row).strip(),
                "seq": row.get("original_sequence", ""),
                "bytes": row.get("original_size_bytes", ""),
                "reason": row["reason"],
            }
            for row in rows
        ]
    )


def _replicas(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"{value} is not between 1 and 64")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchrelay", description=__doc__)
    parser.add_argument("--version", action="version", version=f"torchrelay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    service = commands.add_parser("service", help="run one service", add_help=False)
    service.add_argument("name", choices=sorted(SERVICES))

    schema = commands.add_parser("schema", help="event schemas")
    schema_commands = schema.add_subparsers(dest="schema_command", required=True)
    export = schema_commands.add_parser(
        "export", help="write a JSON Schema per event type and an AsyncAPI 3 document"
    )
    export.add_argument("directory", type=Path)
    schema_commands.add_parser("catalogue", help="print the event catalogue as Markdown")
    schema_commands.add_parser(
        "nats-auth", help="print nats-server's authorization block (users and permissions)"
    )

    state = argparse.ArgumentParser(add_help=False)
    state.add_argument("--state-dir", type=Path, default=None, help=STATE_DIR_HELP)
    state.add_argument("--nats-url", help="use this NATS instead of the platform's own")

    up = commands.add_parser("up", parents=[state], help="run NATS and the four services here")
    up.add_argument("--replicas", type=int, default=1, help="processes per service (default 1)")
    up.add_argument(
        "--detach",
        action="store_true",
        help="run in the background and return once every service is ready "
        "(`torchrelay down` stops it; its output: <state>/logs/up.log)",
    )
    up.add_argument(
        "--timeout", type=float, default=120, help="seconds to be ready in (default 120)"
    )
    down = commands.add_parser("down", help="stop the platform `up` runs (detached or not)")
    down.add_argument("--state-dir", type=Path, default=None, help=STATE_DIR_HELP)
    down.add_argument(
        "--timeout", type=float, default=60, help="seconds to wait for it to stop (default 60)"
    )
    submit = commands.add_parser("submit", parents=[state], help="submit a pipeline (YAML/JSON)")
    submit.add_argument("file", type=Path)
    submit.add_argument("--wait", action="store_true", help="follow it to the end")
    submit.add_argument(
        "--ingest-url",
        help="ingest's HTTP API, where the spec's local files are uploaded (default: "
        "$TORCHRELAY_INGEST_URL, else the local platform's; token: $TORCHRELAY_INGEST_TOKEN)",
    )
    submit.add_argument("--timeout", type=float, default=1800)
    status = commands.add_parser("status", parents=[state], help="pipelines and their stages")
    status.add_argument("id", nargs="?")
    status.add_argument("--json", action="store_true")
    status.add_argument(
        "--follow", action="store_true", help="with ID: follow the pipeline live to its end"
    )
    status.add_argument("--timeout", type=float, default=1800, help="for --follow, seconds")
    _add_operations(commands, state)
    logs = commands.add_parser("logs", parents=[state], help="a run's worker logs")
    logs.add_argument("run_id")
    logs.add_argument("--raw", action="store_true", help="the JSON lines as they are stored")
    board = commands.add_parser(
        "tensorboard", help="TensorBoard over runs' history (loss, samples/s, lr, metrics)"
    )
    board.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="default: every run")
    board.add_argument("--port", type=int, default=6006, help="0: any free port (default 6006)")
    board.add_argument("--state-dir", type=Path, default=None, help=STATE_DIR_HELP)
    predict = commands.add_parser(
        "predict",
        parents=[state],
        help="send an input to a model: its predicted labels when the model declares them",
    )
    predict.add_argument("model")
    predict.add_argument("file", type=Path, help="one input: .npy, or .json list of numbers")
    predict.add_argument(
        "--batched", action="store_true", help="the file holds a batch (first axis), not one"
    )
    predict.add_argument(
        "--raw",
        action="store_true",
        help="send the input as it is: skip the scaling the model declares (preprocessing)",
    )
    predict.add_argument(
        "--json",
        action="store_true",
        help="print the whole answer (plus the decoded labels when the model has them)",
    )
    env = commands.add_parser(
        "env", help="export lines: the platform's NATS URLs (with credentials) and storage"
    )
    env.add_argument("--state-dir", type=Path, default=None, help=STATE_DIR_HELP)
    demo = commands.add_parser("demo", parents=[state], help="run the digits demo pipeline")
    demo.add_argument("--timeout", type=float, default=600)
    _add_deadletters(commands, state)
    return parser


def _add_operations(commands: Any, state: argparse.ArgumentParser) -> None:
    """What an operator asks of a running platform: cancel, deploy, rollback, retry; and
    what it lists: models, datasets, events."""
    cancel = commands.add_parser(
        "cancel", parents=[state], help="stop a pipeline's training (or a run by its id)"
    )
    cancel.add_argument("id", help="a pipeline id or a run id")
    cancel.add_argument("--reason", default="cancelled from the command line")
    deploy = commands.add_parser("deploy", parents=[state], help="roll a trained model version out")
    deploy.add_argument("model")
    deploy.add_argument("version")
    deploy.add_argument("--replicas", type=_replicas, default=1, help="1 to 64")
    rollback = commands.add_parser(
        "rollback", parents=[state], help="put a deployed model's previous version back"
    )
    rollback.add_argument("model")
    rollback.add_argument("--to", help="the version to go to (default: the previous one)")
    undeploy = commands.add_parser(
        "undeploy", parents=[state], help="take a deployed model's endpoint down"
    )
    undeploy.add_argument("model")
    undeploy.add_argument("--reason", default="undeployed from the command line")
    retry = commands.add_parser(
        "retry", parents=[state], help="submit a failed pipeline again, as it was specified"
    )
    retry.add_argument("id")
    retry.add_argument("--wait", action="store_true", help="follow it to the end")
    retry.add_argument("--timeout", type=float, default=1800)
    for name, what in [("models", "trained model versions"), ("datasets", "staged datasets")]:
        listing = commands.add_parser(name, parents=[state], help=f"list the {what}")
        listing.add_argument("--json", action="store_true")
    events = commands.add_parser("events", parents=[state], help="the stream's events")
    events.add_argument("--pipeline", help="only this pipeline's")
    events.add_argument("--last", type=int, default=20, help="how many to show first")
    events.add_argument("--follow", action="store_true", help="then each new one")
    events.add_argument("--json", action="store_true", help="each event as stored")


def _add_deadletters(commands: Any, state: argparse.ArgumentParser) -> None:
    stream = argparse.ArgumentParser(add_help=False)
    stream.add_argument(
        "--stream",
        default=os.environ.get("TORCHRELAY_STREAM_NAME", "TORCHRELAY"),
        help="the platform's stream (default: $TORCHRELAY_STREAM_NAME, else TORCHRELAY)",
    )
    deadletters = commands.add_parser(
        "deadletters", parents=[state, stream], help="dead letters, and replaying their originals"
    )
    deadletters.add_argument("--json", action="store_true")
    actions = deadletters.add_subparsers(dest="deadletters_command")
    # The options again, after `replay`; SUPPRESS keeps values given before it.
    late = argparse.ArgumentParser(add_help=False)
    late.add_argument("--state-dir", type=Path, default=argparse.SUPPRESS)
    late.add_argument("--nats-url", default=argparse.SUPPRESS)
    late.add_argument("--stream", default=argparse.SUPPRESS)
    replay = actions.add_parser(
        "replay", parents=[late], help="republish the original at stream sequence SEQ"
    )
    replay.add_argument("sequence", type=int, metavar="SEQ")


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.command == "service":
        return _service(args.name, rest)
    if rest:
        build_parser().error(f"unrecognised arguments: {' '.join(rest)}")
    if "state_dir" in vars(args):
        from torchrelay.platform import resolve_state_dir

        args.state_dir = resolve_state_dir(args.state_dir)
    return _quietly(handlers_of(args), args)


def _schema(args: argparse.Namespace) -> int:
    if args.schema_command == "catalogue":
        from torchrelay.shared.events.schema import catalogue_markdown

        print(catalogue_markdown(), end="")
        return 0
    if args.schema_command == "nats-auth":
        from torchrelay.shared.bus.principals import authorization_config

        print(authorization_config(), end="")
        return 0
    return _schema_export(args.directory)


def _quietly(handler: Any, args: argparse.Namespace) -> int:
    """Run a command; what people expect to happen ends with a line, never a traceback: a
    Ctrl-C (130), a reader that closed the pipe (`status | head`), a platform that is not
    there (2)."""
    from torchrelay.shared.errors import ConfigError

    try:
        result: int = handler(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Nothing more can be said to a closed pipe: point stdout at /dev/null so that the
        # interpreter's own flush at exit stays quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except ConfigError as exc:
        print(f"torchrelay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return result


def handlers_of(args: argparse.Namespace) -> Any:
    handlers = {
        "schema": _schema,
        "cancel": _request,
        "deploy": _request,
        "rollback": _request,
        "undeploy": _request,
        "retry": _request,
        "models": _listing,
        "datasets": _listing,
        "events": _events,
        "up": _up,
        "down": _down,
        "submit": _submit,
        "status": _status,
        "logs": _logs,
        "tensorboard": _tensorboard,
        "predict": _predict,
        "demo": _demo,
        "deadletters": _deadletters,
        "env": _env,
    }
    return handlers[args.command]
