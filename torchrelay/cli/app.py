"""The command tree: every ``torchrelay`` command, grouped as ``--help`` shows them."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Annotated

import typer

from torchrelay import __version__
from torchrelay.cli import admin, history, local, models, pipelines, pruning
from torchrelay.cli.base import command

app = typer.Typer(
    name="torchrelay",
    help="Take PyTorch work from dataset to served model, on this machine or on Kubernetes.",
    no_args_is_help=True,
    add_completion=False,
    # Panels and colour on a terminal; plain click text in a pipe or a log, where a boxed,
    # re-wrapped message would hide from grep.
    rich_markup_mode="rich" if sys.stderr.isatty() else None,
    # An unexpected error is a bug: its traceback, without the locals (they hold credentials).
    pretty_exceptions_show_locals=False,
)

PANELS: dict[str, list[Callable[..., int]]] = {
    "The platform here": [local.up, local.down, local.env, local.demo],
    "Pipelines": [
        pipelines.submit,
        pipelines.status,
        pipelines.cancel,
        pipelines.retry,
        pipelines.events,
    ],
    "Data and models": [
        models.datasets,
        models.models,
        models.deploy,
        models.rollback,
        models.undeploy,
        pruning.prune,
    ],
    "Using a model": [models.predict],
    "Run history": [history.logs, history.tensorboard],
}
for panel, functions in PANELS.items():
    for function in functions:
        app.command(rich_help_panel=panel)(command(function))
app.add_typer(admin.deadletters, rich_help_panel="Operation")
app.add_typer(admin.schema, rich_help_panel="Operation")
app.command(
    rich_help_panel="Operation",
    # Everything after the name is the service's own: its options, --help included.
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)(command(local.service))


def _version(shown: bool) -> None:
    if shown:
        print(f"torchrelay {__version__}")  # noqa: T201
        raise typer.Exit()


@app.callback()
def _options(
    *,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Take PyTorch work from dataset to served model, on this machine or on Kubernetes."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line (``argv``: the arguments, default the process's own); the exit
    status."""
    try:
        app(args=list(argv) if argv is not None else None, prog_name="torchrelay")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
    return 0
