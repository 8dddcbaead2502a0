"""``torchrelay prune``: the monitor removes what is older than an AGE (``90s``, ``15m``,
``12h``, ``30d``, ``2w``), never what serves or what a live pipeline uses; its answer as
table rows. All but the command itself is pure."""

from __future__ import annotations

import json
import re
from enum import StrEnum
from typing import Annotated, Any, cast

import typer

from torchrelay.cli.base import (
    EXIT_USAGE,
    Json,
    NatsUrl,
    Refusal,
    StateDir,
    connected,
    run,
    say,
    show_table,
    state_dir,
)
from torchrelay.shared.events.data import PRUNE_KINDS, PrunedData, PruneKind

Kind = StrEnum("Kind", {kind: kind for kind in PRUNE_KINDS})  # type: ignore[misc]


def prune(
    *,
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than", metavar="AGE", help="e.g. 90s, 15m, 12h, 30d, 2w.", show_default=False
        ),
    ],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would go.")] = False,
    kind: Annotated[
        list[Kind] | None,
        typer.Option(
            "--kind", help="Only this kind (repeatable; default: every kind).", show_default=False
        ),
    ] = None,
    json_out: Json = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for it.")] = 300,
    state: StateDir = None,
    nats_url: NatsUrl = None,
) -> int:
    """Remove old datasets, models, runs, pipelines and workspaces (never what serves or what
    a live pipeline uses); exit 1 when something could not be removed."""
    try:
        older_than_s = parse_age(older_than)
    except ValueError as exc:
        raise Refusal(str(exc), EXIT_USAGE) from None
    kinds = [cast(PruneKind, str(k)) for k in kind] if kind else None

    async def go() -> PrunedData:
        async with connected(state_dir(state), nats_url) as client:
            return await client.prune(older_than_s, dry_run=dry_run, kinds=kinds, timeout_s=timeout)

    try:
        result = run(go())
    except TimeoutError as exc:
        raise Refusal(str(exc)) from None
    if json_out:
        say(json.dumps(result.model_dump(mode="json"), indent=2))
    else:
        show_table(prune_rows(result))
        say("\n".join(prune_summary(result)))
    return 1 if result.problems else 0


UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_AGE = re.compile(r"^([0-9]+)([smhdw])$")


def parse_age(text: str) -> float:
    """Seconds in an AGE such as ``90s``, ``15m``, ``12h``, ``30d`` or ``2w``; ValueError with
    what is accepted, for anything else (no unit, a fraction, zero)."""
    match = _AGE.fullmatch(text.strip())
    if match is None or int(match[1]) == 0:
        raise ValueError(
            f"AGE {text!r} is not a positive whole number with a unit: "
            "s, m, h, d or w (e.g. 90s, 15m, 12h, 30d, 2w)"
        )
    return float(int(match[1]) * UNITS_S[match[2]])


def age_text(seconds: float) -> str:
    """An age in its largest whole unit, as an AGE is written (``40d``, ``3h``, ``59s``)."""
    for unit in ("w", "d", "h", "m"):
        if seconds >= UNITS_S[unit] and seconds % UNITS_S[unit] < 1:
            return f"{int(seconds // UNITS_S[unit])}{unit}"
    for unit in ("d", "h", "m"):
        if seconds >= UNITS_S[unit]:
            return f"{int(seconds // UNITS_S[unit])}{unit}"
    return f"{int(seconds)}s"


def prune_rows(result: PrunedData) -> list[dict[str, Any]]:
    """One row per removed (or, on a dry run, to-be-removed) item, then per kept item."""
    done = "would remove" if result.dry_run else "removed"
    return [
        {
            "action": action,
            "kind": item.kind,
            "name": item.name,
            "age": age_text(item.age_s),
            "why kept": item.reason or "",
        }
        for action, items in ((done, result.removed), ("kept", result.kept))
        for item in items
    ]


def bytes_text(size: int) -> str:
    """``1536`` -> ``1.5 KiB``: bytes in the largest binary unit that is at least 1."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def prune_summary(result: PrunedData) -> list[str]:
    """The lines under the table: bytes freed (or that would be), then each problem."""
    freed = "would free" if result.dry_run else "freed"
    lines = [
        f"{freed} {bytes_text(result.bytes_freed)} ({len(result.removed)} removed, "
        f"{len(result.kept)} kept)"
    ]
    lines.extend(f"problem: {problem}" for problem in result.problems)
    return lines
