"""The platform's contracts and its dead letters: ``schema ...`` and ``deadletters``."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from torchrelay.cli.base import (
    Json,
    NatsUrl,
    Refusal,
    StateDir,
    command,
    nats_url,
    run,
    say,
    show_rows,
    show_table,
    state_dir,
)

if TYPE_CHECKING:
    from torchrelay.shared.bus.jetstream import JetStreamBus

schema = typer.Typer(
    name="schema", help="The event schemas and NATS permissions.", no_args_is_help=True
)


@schema.command("export")
@command
def schema_export(
    directory: Annotated[Path, typer.Argument(help="Where to write them.", show_default=False)],
) -> int:
    """Write a JSON Schema per event type, an AsyncAPI 3 document and the pipeline's schema."""
    from torchrelay.shared.events.data import PipelineSpec
    from torchrelay.shared.events.schema import (
        all_json_schemas,
        asyncapi_document,
        schema_file_name,
    )

    directory.mkdir(parents=True, exist_ok=True)
    schemas = all_json_schemas()
    for event_type, described in schemas.items():
        (directory / schema_file_name(event_type)).write_text(
            json.dumps(described, indent=2) + "\n"
        )
    (directory / "asyncapi.json").write_text(json.dumps(asyncapi_document(), indent=2) + "\n")
    pipeline = PipelineSpec.model_json_schema()
    (directory / "pipeline.schema.json").write_text(json.dumps(pipeline, indent=2) + "\n")
    say(
        f"wrote {len(schemas)} event schemas, asyncapi.json and pipeline.schema.json to {directory}"
    )
    return 0


@schema.command("catalogue")
@command
def schema_catalogue() -> int:
    """Print the event catalogue as Markdown."""
    from torchrelay.shared.events.schema import catalogue_markdown

    print(catalogue_markdown(), end="")  # noqa: T201
    return 0


@schema.command("nats-auth")
@command
def schema_nats_auth() -> int:
    """Print nats-server's authorization block (users and permissions)."""
    from torchrelay.shared.bus.principals import authorization_config

    print(authorization_config(), end="")  # noqa: T201
    return 0


Stream = Annotated[
    str,
    typer.Option(
        "--stream",
        help="The platform's stream (default: $TORCHRELAY_STREAM_NAME, else TORCHRELAY).",
        show_default=False,
    ),
]


deadletters = typer.Typer(
    name="deadletters",
    help="Dead letters (events a service could not handle), and replaying their originals.",
    invoke_without_command=True,
)


@deadletters.callback()
@command
def deadletters_list(
    context: typer.Context,
    *,
    json_out: Json = False,
    stream: Stream = "",
    state: StateDir = None,
    nats_url_given: NatsUrl = None,
) -> int:
    """List the dead letters the stream holds (`deadletters replay SEQ` republishes one)."""
    if context.invoked_subcommand is not None:  # options given before `replay` are its too
        context.obj = {"stream": stream, "state": state, "nats_url": nats_url_given}
        return 0
    from torchrelay.shared.bus.deadletters import listing_row

    async def go() -> list[dict[str, object]]:
        async with _stream(stream, state, nats_url_given) as bus:
            return [listing_row(sequence, letter) for sequence, letter in await bus.dead_letters()]

    rows = run(go())
    if json_out:
        show_rows(rows, as_json=True)
    else:
        show_table(dead_letter_rows(rows))
    return 0


@deadletters.command("replay")
@command
def deadletters_replay(
    context: typer.Context,
    sequence: Annotated[int, typer.Argument(metavar="SEQ", help="The original's stream sequence.")],
    *,
    stream: Stream = "",
    state: StateDir = None,
    nats_url_given: NatsUrl = None,
) -> int:
    """Republish the original event at stream sequence SEQ."""
    from torchrelay.shared.bus.deadletters import ReplayRefused

    before = context.obj or {}

    async def go() -> int:
        async with _stream(
            stream or before.get("stream", ""),
            state or before.get("state"),
            nats_url_given or before.get("nats_url"),
        ) as bus:
            try:
                return (await bus.replay(sequence)).sequence
            except ReplayRefused as exc:
                raise Refusal(str(exc)) from None

    say(f"replayed sequence {sequence} as sequence {run(go())}")
    return 0


@asynccontextmanager
async def _stream(
    name: str, state: Path | None, given_url: str | None
) -> AsyncIterator[JetStreamBus]:
    """The platform's stream (``name``, else $TORCHRELAY_STREAM_NAME, else TORCHRELAY) as it
    is: no ensure_stream, since reading and replaying must not reconfigure it. A
    :class:`Refusal` when this NATS has no such stream."""
    name = name or os.environ.get("TORCHRELAY_STREAM_NAME", "TORCHRELAY")
    from torchrelay.shared.bus.connection import NatsSettings, connect
    from torchrelay.shared.bus.jetstream import JetStreamBus, StreamSettings

    nc = await connect(NatsSettings(url=nats_url(state_dir(state), given_url), startup_wait_s=10))
    bus = JetStreamBus(nc, StreamSettings(name=name), source="/torchrelay/cli")
    try:
        if not await bus.stream_ready():
            raise Refusal(f"no stream {name} on this NATS")
        yield bus
    finally:
        await bus.aclose()


def dead_letter_rows(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """The listing's columns for people: when, which consumer, the original, why."""

    def original(row: dict[str, object]) -> str:
        described = row.get("original_type") or row.get("original_subject") or "?"
        return f"{described} {row.get('original_id') or row.get('original_msg_id') or ''}"

    return [
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
