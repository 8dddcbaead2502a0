"""What runs left on the storage: ``logs`` (every rank's, readable) and ``tensorboard`` (of
runs, or of a sweep's trials side by side)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from torchrelay.cli.base import (
    EXIT_USAGE,
    NatsUrl,
    Refusal,
    StateDir,
    connected,
    run,
    say,
    state_dir,
    storage_root,
)

if TYPE_CHECKING:
    from torchrelay.shared.sweep_state import SweepRecord


def logs(
    run_id: Annotated[str, typer.Argument(help="A run id.", show_default=False)],
    *,
    raw: Annotated[bool, typer.Option("--raw", help="The JSON lines as they are stored.")] = False,
    state: StateDir = None,
) -> int:
    """Every attempt's rank logs of a run: a line per event, tracebacks on their own lines."""
    from torchrelay.client import render_log_line
    from torchrelay.shared.errors import UnsafePath
    from torchrelay.shared.storage.layout import RANK_LOG_GLOB, Layout

    try:
        folder = Layout(storage_root(state_dir(state))).logs(run_id)
    except UnsafePath as exc:
        raise Refusal(str(exc), EXIT_USAGE) from None
    found = sorted(folder.glob(RANK_LOG_GLOB))
    if not found:
        raise Refusal(f"no logs for run {run_id} under {folder}")
    styled = sys.stdout.isatty() and not raw
    for log in found:
        header = f"==> {log.parent.name}/{log.name} <=="
        with log.open(errors="replace") as lines:
            if styled:
                _show_styled(header, lines)
                continue
            say(header)
            for line in lines:
                say(line.rstrip("\n") if raw else render_log_line(line))
    return 0


def _show_styled(header: str, lines: Iterable[str]) -> None:
    """On a terminal: the same lines, the time dimmed, errors and warnings coloured, and a
    traceback in red."""
    from rich.console import Console
    from rich.text import Text

    from torchrelay.client import render_log_line

    console = Console(highlight=False, soft_wrap=True)
    console.print(header, style="bold", markup=False)
    for line in lines:
        head, *traceback = render_log_line(line).split("\n")
        words = head.split(maxsplit=2)
        text = Text(head, style=_LEVEL_STYLES.get(words[1] if len(words) > 1 else "", ""))
        if len(words) > 1 and words[1] in _LEVEL_STYLES:
            text.stylize("dim", 0, len(words[0]))
        console.print(text)
        for row in traceback:
            console.print(Text(row, style="red"))


_LEVEL_STYLES = {
    "debug": "dim",
    "info": "",
    "warning": "yellow",
    "error": "red",
    "critical": "bold red",
}


def tensorboard(
    run_ids: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="RUN_ID|SWEEP_ID",
            help="Default: every run. A sweep's id: its trials side by side.",
            show_default=False,
        ),
    ] = None,
    *,
    port: Annotated[int, typer.Option("--port", help="0: any free port.")] = 6006,
    state: StateDir = None,
    nats_url: NatsUrl = None,
) -> int:
    """TensorBoard over runs' history (loss, samples/s, lr, metrics), on 127.0.0.1; of a
    sweep, one run per trial (trial-<index>; `torchrelay status` has their hyperparameters)."""
    import importlib.util
    import signal
    import socket
    import subprocess

    from torchrelay.shared.errors import UnsafePath

    platform_state = state_dir(state)
    root = storage_root(platform_state)
    try:
        folders = board_folders(
            root, run_ids or [], lambda sweep: _sweep_record(platform_state, nats_url, sweep)
        )
    except UnsafePath as exc:
        raise Refusal(str(exc), EXIT_USAGE) from None
    except LookupError as exc:
        raise Refusal(str(exc.args[0])) from None
    if any("," in str(folder) for folder in folders.values()):
        raise Refusal(f"TensorBoard cannot read a path with a comma: {root}", EXIT_USAGE)
    if importlib.util.find_spec("tensorboard") is None:
        raise Refusal(
            "TensorBoard is not installed in this environment: pip install 'torchrelay[train]'"
        )
    if port == 0:  # a free port, chosen here so that the URL can be printed before it starts
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    # --logdir_spec takes name:path pairs; its names cannot hold ":" (run ids may).
    spec = ",".join(f"{name.replace(':', '_')}:{path.absolute()}" for name, path in folders.items())
    argv = [sys.executable, "-m", "tensorboard.main", "--logdir_spec", spec]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    say(f"TensorBoard over {', '.join(folders)}: http://127.0.0.1:{port}/  (Ctrl-C stops it)")

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


def board_folders(
    root: Path,
    run_ids: Sequence[str],
    sweep_record: Callable[[str], SweepRecord | None] | None,
) -> dict[str, Path]:
    """The folders TensorBoard shows, by name: of one sweep, when the one id given is no run
    but a sweep's (its trials, see :func:`sweep_histories`), else of runs (:func:`histories`).

    A sweep's trials come from its record (``sweep_record``, which asks the platform; None when
    no platform is there to ask); without one, from the runs on the storage named as its trials
    (``<sweep>.trial-<index>``), so a stopped platform's sweep can still be looked at."""
    from torchrelay.shared.storage.layout import Layout

    if len(run_ids) == 1 and not Layout(root).run(run_ids[0]).is_dir():
        sweep_id = run_ids[0]
        record = sweep_record(sweep_id) if sweep_record is not None else None
        if record is not None:
            return sweep_histories(root, sweep_id, {t.index: t.run_id for t in record.trials})
        if trials := trials_on_storage(root, sweep_id):
            return sweep_histories(root, sweep_id, trials)
    return histories(root, run_ids)


def sweep_histories(root: Path, sweep_id: str, trials: Mapping[int, str]) -> dict[str, Path]:
    """``trial-<index>`` -> the trial's history folder, in trial order, for the trials (index
    -> run id) that have history: TensorBoard draws them side by side under short names (no
    ':' or ',', which ``--logdir_spec`` cannot hold). LookupError (one line) when none has."""
    from torchrelay.client import HistoryNotFound, history_attempts
    from torchrelay.shared.storage.layout import Layout

    layout, found = Layout(root), {}
    for index, run_id in sorted(trials.items()):
        try:
            history_attempts(root, run_id)
        except HistoryNotFound:
            continue  # not started yet, or ended before it reported progress
        found[f"trial-{index}"] = layout.history(run_id)
    if not found:
        raise LookupError(
            f"sweep {sweep_id}: none of its {len(trials)} trials has history yet: rank 0 of "
            "each trial's run writes it as it trains"
        )
    return found


def trials_on_storage(root: Path, sweep_id: str) -> dict[int, str]:
    """Index -> run id of the runs under ``root`` named as trials of ``sweep_id``
    (:func:`~torchrelay.shared.sweep_state.trial_run_id`)."""
    from torchrelay.shared.storage.layout import RUNS
    from torchrelay.shared.sweep_state import trial_run_id

    found = {}
    for run_folder in sorted(root.joinpath(RUNS).iterdir()) if (root / RUNS).is_dir() else []:
        head, _, index = run_folder.name.rpartition(".trial-")
        if head != sweep_id or not (index.isascii() and index.isdigit()):
            continue
        if trial_run_id(sweep_id, int(index)) == run_folder.name:  # trial-01 is no trial's
            found[int(index)] = run_folder.name
    return found


def _sweep_record(state: Path, given_url: str | None, sweep_id: str) -> SweepRecord | None:
    """The sweep's record from the platform; None when no platform is there to ask (none
    named, none runs from ``state``)."""
    from torchrelay import platform

    if not (given_url or os.environ.get("TORCHRELAY_NATS_URL") or platform.running(state)):
        return None

    async def read() -> SweepRecord | None:
        async with connected(state, given_url) as client:
            return await client.sweep(sweep_id)

    return run(read())


def histories(root: Path, run_ids: Sequence[str]) -> dict[str, Path]:
    """Run id -> its history folder, for the named runs or (none named) every run with one.
    LookupError (one line) for an unknown run, a run without history, or no history at all;
    UnsafePath for a run id that is not one path segment."""
    from torchrelay.client import HistoryNotFound, history_attempts
    from torchrelay.shared.storage.layout import RUNS, Layout

    layout, runs = Layout(root), root / RUNS

    def has_history(run_id: str) -> bool:
        try:
            return bool(history_attempts(root, run_id))
        except HistoryNotFound:
            return False

    if not run_ids:
        found = {
            run.name: layout.history(run.name)
            for run in sorted(runs.iterdir() if runs.is_dir() else [])
            if has_history(run.name)
        }
        if not found:
            raise LookupError(
                f"no run history under {runs}: rank 0 of a run writes it as it trains"
            )
        return found
    for run_id in run_ids:
        history_attempts(root, run_id)  # HistoryNotFound says which and why
    return {run_id: layout.history(run_id) for run_id in dict.fromkeys(run_ids)}
