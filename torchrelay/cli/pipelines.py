"""Pipelines: ``submit``, ``status``, ``cancel``, ``retry``, and the stream's ``events``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from torchrelay.cli.base import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Json,
    NatsUrl,
    Refusal,
    StateDir,
    Timeout,
    Wait,
    connected,
    run,
    say,
    show_table,
    state_dir,
    tell,
    warn,
)

if TYPE_CHECKING:
    from torchrelay.client import Client
    from torchrelay.shared.sweep_state import SweepRecord
    from torchrelay.specfile import Uploader

PipelineId = Annotated[str, typer.Argument(help="A pipeline id.", show_default=False)]


def submit(
    file: Annotated[Path, typer.Argument(help="The pipeline spec (YAML or JSON).")],
    *,
    wait: Wait = False,
    ingest_url: Annotated[
        str | None,
        typer.Option(
            "--ingest-url",
            help="Ingest's HTTP API, where the spec's local files are uploaded (default: "
            "$TORCHRELAY_INGEST_URL, else the local platform's; token: $TORCHRELAY_INGEST_TOKEN).",
            show_default=False,
        ),
    ] = None,
    timeout: Timeout = 1800,
    state: StateDir = None,
    nats_url: NatsUrl = None,
) -> int:
    """Submit a pipeline; its local data and code are uploaded to ingest first."""
    from torchrelay import specfile

    folder = state_dir(state)
    following: list[str] = []

    async def go() -> int:
        try:
            spec = await specfile.prepare(file, lambda: _uploader(folder, ingest_url), say)
        except specfile.SpecError as exc:
            raise Refusal(str(exc), EXIT_USAGE) from None
        async with connected(folder, nats_url) as client:
            pipeline_id = await client.submit(spec)
            following.append(pipeline_id)
            say(f"submitted {pipeline_id}")
            return await follow(client, pipeline_id, timeout) if wait else 0

    try:
        return run(go())
    except KeyboardInterrupt:
        return let_go(following[0]) if wait and following else EXIT_INTERRUPTED


def _uploader(folder: Path, ingest_url: str | None) -> Uploader:
    """Where a spec's local files are uploaded: --ingest-url, $TORCHRELAY_INGEST_URL, or the
    ingest of the platform running from the state folder."""
    from torchrelay import platform, specfile

    url = ingest_url or os.environ.get("TORCHRELAY_INGEST_URL")
    if not url:
        described = platform.running(folder) or {}
        services = described.get("services", {})
        url = next((s["url"] for n, s in sorted(services.items()) if n.startswith("ingest")), None)
    if not url:
        raise specfile.SpecError(
            "the spec names local files, which are uploaded to ingest: start the platform "
            "(`torchrelay up`) or pass --ingest-url (or set TORCHRELAY_INGEST_URL)"
        )
    return specfile.Uploader(url, token=os.environ.get("TORCHRELAY_INGEST_TOKEN"))


async def follow(client: Client, pipeline_id: str, timeout_s: float) -> int:
    """Follow a pipeline to its end (bars on a terminal, lines elsewhere): 0 when it
    succeeded, else 1 saying why."""
    from torchrelay.cli.progress import report_for_terminal
    from torchrelay.client import PipelineRefused, failure_report
    from torchrelay.shared.pipelines import train_run_id

    current = await client.record(pipeline_id)
    try:
        with report_for_terminal(current.spec if current else None) as report:
            record = await client.wait(pipeline_id, timeout_s=timeout_s, report=report)
    except PipelineRefused as exc:
        raise Refusal(f"pipeline {pipeline_id} refused: {exc.reason}") from None
    except TimeoutError:
        raise Refusal(
            f"{pipeline_id} is still running after {timeout_s:g}s; it goes on: "
            f"`torchrelay status {pipeline_id} --follow` follows it again"
        ) from None
    say(f"{pipeline_id}: {record.status}")
    if record.status == "succeeded":
        return 0
    run_record = await client.run(train_run_id(pipeline_id))
    for line in failure_report(record, run_record):
        tell(line)
    return 1


def let_go(pipeline_id: str) -> int:
    """Ctrl-C while following: the pipeline goes on, and this is how to follow it again."""
    warn(
        f"stopped following {pipeline_id}; the pipeline goes on: "
        f"`torchrelay status {pipeline_id} --follow` follows it again"
    )
    return EXIT_INTERRUPTED


def status(
    pipeline_id: Annotated[
        str | None,
        typer.Argument(help="One pipeline (default: everything).", show_default=False),
    ] = None,
    *,
    follow_it: Annotated[
        bool, typer.Option("--follow", help="With an id: follow the pipeline live to its end.")
    ] = False,
    json_out: Json = False,
    timeout: Timeout = 1800,
    state: StateDir = None,
    nats_url: NatsUrl = None,
) -> int:
    """Pipelines, runs, models and deployments; or one pipeline's stages and its sweep's
    trials, best first (--follow: live)."""
    from torchrelay.client import lineage, sweep_report, timing

    folder = state_dir(state)

    async def go() -> int:
        async with connected(folder, nats_url) as client:
            if pipeline_id is None:
                rows = (await client.inventory()).rows()
                if json_out:
                    say(json.dumps(rows, indent=2, default=str))
                    return 0
                for kind, listed in rows.items():
                    show_table(listed, title=kind)
                    say("")
                return 0
            record = await client.record(pipeline_id)
            if record is None:
                raise Refusal(f"no pipeline {pipeline_id}")
            if follow_it:
                return await follow(client, pipeline_id, timeout)
            report = timing(record)
            # A sweep's id is its pipeline's; its trials are planned once the data is staged.
            sweep = None if record.spec.sweep is None else await client.sweep(pipeline_id)
            if json_out:
                if record.spec.sweep is not None:
                    report["sweep"] = None if sweep is None else sweep_report(sweep)
                say(json.dumps(report, indent=2, default=str))
                return 0
            say(f"{report['pipeline_id']} ({report['name']}): {report['status']}")
            linked = lineage(record)
            chain = [f"{k} {linked[k]}" for k in ("dataset", "run", "model", "endpoint")]
            say("  lineage: " + " -> ".join(c for c in chain if not c.endswith(" ")))
            for name, stage in report["stages"].items():
                seconds = "" if stage["seconds"] is None else f"{stage['seconds']:.2f}s"
                note = stage["reason"] or " ".join(
                    f"{k}={v}" for k, v in stage["detail"].items() if not isinstance(v, dict)
                )
                say(f"  {name:7s} {stage['status']:9s} {seconds:>9s}  {note}")
            if report["overhead_seconds"] is not None:
                say(f"  platform overhead (gaps between stages): {report['overhead_seconds']:.2f}s")
            if record.spec.sweep is not None:
                say("")
                if sweep is None:
                    say("sweep: no trials yet (they are planned once the dataset is staged)")
                else:
                    show_sweep(sweep)
            return 0

    try:
        return run(go())
    except KeyboardInterrupt:
        return let_go(pipeline_id) if follow_it and pipeline_id else EXIT_INTERRUPTED


def show_sweep(record: SweepRecord) -> None:
    """A sweep's headline and its trials as a table, best first, the best marked."""
    from torchrelay.client import BEST_MARK, sweep_headline, sweep_rows

    rows = sweep_rows(record)
    say(sweep_headline(record))
    show_table(rows)
    if any(row["trial"].endswith(BEST_MARK) for row in rows):
        ended = record.best_trial is not None
        say(f"  {BEST_MARK} {'best trial' if ended else 'best completed trial so far'}")


def cancel(
    ident: Annotated[str, typer.Argument(help="A pipeline id or a run id.", show_default=False)],
    *,
    reason: Annotated[str, typer.Option("--reason")] = "cancelled from the command line",
    state: StateDir = None,
    nats_url: NatsUrl = None,
) -> int:
    """Stop a pipeline's training (a sweep's: every trial), or a run by its id."""

    async def go() -> str:
        async with connected(state_dir(state), nats_url) as client:
            return await client.cancel(ident, reason)

    say(f"cancel of {run(go())} requested; `torchrelay status` shows it end")
    return 0


def retry(
    pipeline_id: PipelineId,
    *,
    wait: Wait = False,
    timeout: Timeout = 1800,
    state: StateDir = None,
    nats_url: NatsUrl = None,
) -> int:
    """Submit a failed pipeline again, as it was specified, under a new id."""
    following: list[str] = []

    async def go() -> int:
        async with connected(state_dir(state), nats_url) as client:
            new_id = await client.retry(pipeline_id)
            following.append(new_id)
            say(f"submitted {new_id} (a retry of {pipeline_id})")
            return await follow(client, new_id, timeout) if wait else 0

    try:
        return run(go())
    except KeyboardInterrupt:
        return let_go(following[0]) if wait and following else EXIT_INTERRUPTED


def events(
    *,
    pipeline: Annotated[
        str | None, typer.Option("--pipeline", help="Only this pipeline's.", show_default=False)
    ] = None,
    last: Annotated[int, typer.Option("--last", min=0, help="How many to show first.")] = 20,
    follow_on: Annotated[bool, typer.Option("--follow", help="Then each new one.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Each event as stored.")] = False,
    state: StateDir = None,
    nats_url: NatsUrl = None,
) -> int:
    """The stream's last events, one line each; --follow goes on with new ones."""
    from torchrelay.client import event_line

    async def go() -> int:
        async with connected(state_dir(state), nats_url) as client:
            async for event in client.events(last=last, follow=follow_on, pipeline_id=pipeline):
                say(json.dumps(event) if json_out else event_line(event))
        return 0

    return run(go())
