"""What every command shares: exit codes, the options that find the platform, one-line
refusals, tables, and connecting a :class:`~torchrelay.client.Client`."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import typer
from pydantic import ValidationError

from torchrelay.shared.errors import ConfigError, Refused

if TYPE_CHECKING:
    from torchrelay.client import Client

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
"""128 + SIGINT, as shells report a command Ctrl-C stopped."""
EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE, as a command that wrote to a closed pipe reports it."""

StateDir = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="The platform's state folder (default: $TORCHRELAY_STATE_DIR, else "
        "$XDG_STATE_HOME/torchrelay, else ~/.local/state/torchrelay).",
        show_default=False,
    ),
]
NatsUrl = Annotated[
    str | None,
    typer.Option(
        "--nats-url", help="Use this NATS instead of the platform's own.", show_default=False
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
Wait = Annotated[bool, typer.Option("--wait", help="Follow it to the end.")]
Timeout = Annotated[float, typer.Option("--timeout", help="Seconds to wait.")]

T = TypeVar("T")
P = ParamSpec("P")


class Refusal(Refused):
    """An expected failure: the command says why on one line (``torchrelay: ...``) and exits
    with ``code`` (a :class:`Refused` from the client exits 1), never with a traceback."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def say(line: str) -> None:
    """A line on stdout, flushed at once (a follower may be reading it line by line)."""
    print(line, flush=True)  # noqa: T201


def warn(line: str) -> None:
    """A one-line complaint on stderr, as ``torchrelay: ...``."""
    tell(f"torchrelay: {line}")


def tell(line: str) -> None:
    """A line on stderr: what went wrong, for a person."""
    print(line, file=sys.stderr, flush=True)  # noqa: T201


def state_dir(given: Path | None) -> Path:
    """``--state-dir``, else ``$TORCHRELAY_STATE_DIR``, else the per-user default."""
    from torchrelay.platform import resolve_state_dir

    return resolve_state_dir(given)


def nats_url(state: Path, given: str | None) -> str:
    """The NATS to talk to: ``--nats-url``, ``$TORCHRELAY_NATS_URL``, else the platform that
    runs from ``state`` (as the operator's user); a :class:`Refusal` when there is none."""
    from torchrelay import platform

    if given or os.environ.get("TORCHRELAY_NATS_URL"):
        return str(given or os.environ["TORCHRELAY_NATS_URL"])
    described = platform.running(state)
    if described is None:
        raise Refusal(
            f"no platform runs from {state}: start one with `torchrelay up` or pass --nats-url",
            EXIT_USAGE,
        )
    return platform.client_url(state, str(described["nats_url"]))


def storage_root(state: Path) -> Path:
    """The platform's storage: where the running one says, else the state folder's own (a
    stopped platform kept it there)."""
    from torchrelay import platform

    described = platform.running(state)
    return Path(described["storage_root"]) if described else state / "storage"


@asynccontextmanager
async def connected(state: Path, given_url: str | None) -> AsyncIterator[Client]:
    """A client of the platform, closed on the way out."""
    from torchrelay.client import Client

    client = await Client.connect(nats_url(state, given_url))
    try:
        yield client
    finally:
        await client.aclose()


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def show_table(rows: list[dict[str, Any]], *, title: str | None = None) -> None:
    """Rows as a table headed by their keys: boxed on a terminal, plain aligned columns (one
    row a line, nothing cut) in a pipe, so that ``grep`` and ``awk`` read it."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    terminal = sys.stdout.isatty()
    console = Console(highlight=False, markup=False, width=None if terminal else 10_000)
    if title is not None:
        console.print(title.upper() if not terminal else title, style="bold")
    if not rows:
        console.print("  (none)")
        return
    grid = Table(
        box=box.SIMPLE_HEAD if terminal else None,
        show_edge=terminal,
        header_style="bold" if terminal else "",
        pad_edge=True,
        padding=(0, 1),
    )
    columns = list(rows[0])
    for column in columns:
        grid.add_column(column.upper(), overflow="fold", no_wrap=not terminal)
    for row in rows:
        grid.add_row(*(str(row.get(column, "")) for column in columns))
    if terminal:
        console.print(grid)
        return
    with console.capture() as captured:
        console.print(grid)
    for line in captured.get().splitlines():
        say(line.rstrip())


def show_rows(rows: list[dict[str, Any]], as_json: bool) -> None:
    """Rows as JSON (``--json``) or as a table."""
    if as_json:
        say(json.dumps(rows, indent=2, default=str))
    else:
        show_table(rows)


def command(function: Callable[P, int]) -> Callable[P, None]:
    """A command as typer runs it: its int is the exit status, and what people expect to
    happen ends with a line, never a traceback: a refusal (its own status), Ctrl-C (130), a
    reader that closed the pipe (`status | head`, 141), a bad setting (2)."""

    @functools.wraps(function)
    def run_command(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            code = function(*args, **kwargs)
            sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
        except Refused as refused:
            warn(str(refused))
            code = refused.code if isinstance(refused, Refusal) else 1
        except ConfigError as exc:
            warn(str(exc))
            code = EXIT_USAGE
        except ValidationError as exc:  # a request built from what was typed: a usage mistake
            for problem in exc.errors():
                where = ".".join(str(part) for part in problem["loc"])
                warn(f"{where}: {problem['msg']}" if where else problem["msg"])
            code = EXIT_USAGE
        except KeyboardInterrupt:
            code = EXIT_INTERRUPTED
        except BrokenPipeError:
            # Nothing more can be said to a closed pipe: point stdout at /dev/null so that the
            # interpreter's own flush at exit stays quiet too.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            code = EXIT_BROKEN_PIPE
        if code:
            raise typer.Exit(code)

    return run_command
