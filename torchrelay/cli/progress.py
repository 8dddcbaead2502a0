"""Following a pipeline live: on a terminal, a progress bar per stage (staging, training by
epoch with its loss and throughput, the rollout); anywhere else, a line per change."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from torchrelay.client import LineReport, PipelineRefused, Report, loss_text
from torchrelay.shared.pipelines import STAGES, PipelineRecord

if TYPE_CHECKING:
    from torchrelay.shared.events.data import PipelineSpec

_LABELS = {"ingest": "staging", "train": "training", "deploy": "rollout"}
_STYLES = {"succeeded": "green", "failed": "red", "skipped": "yellow", "cancelled": "yellow"}


def planned_epochs(spec: PipelineSpec | None) -> int | None:
    """The epochs a pipeline trains for, when its hyperparameters say (``epochs``): the
    training bar's length. None when they do not (the bar then counts steps)."""
    if spec is None:
        return None
    epochs = spec.training.hyperparameters.get("epochs")
    return (
        epochs if isinstance(epochs, int) and not isinstance(epochs, bool) and epochs > 0 else None
    )


class BarReport(Report):
    """A bar per stage. Training fills by epoch (when the spec says how many) and shows the
    step, loss and samples/s of the latest ``train.progress``; a finished stage shows what its
    record says (dataset version, model version, endpoint) or why it failed."""

    def __init__(self, progress: Progress, epochs: int | None) -> None:
        self._progress = progress
        self._epochs = epochs
        self._status: dict[str, str] = {}
        self._tasks: dict[str, TaskID] = {
            name: progress.add_task(_LABELS[name], total=None, start=False, note="pending")
            for name in STAGES
        }

    def record(self, record: PipelineRecord) -> None:
        for name in STAGES:
            stage = record.stages[name]
            if self._status.get(name) == stage.status:
                continue
            self._status[name] = stage.status
            task = self._tasks[name]
            if stage.status == "running":
                self._progress.start_task(task)
                total = self._epochs if name == "train" else None
                self._progress.update(task, total=total, note="running")
                continue
            if stage.status == "pending":
                continue
            note = stage.reason or " ".join(
                f"{k}={v}" for k, v in stage.detail.items() if not isinstance(v, dict | list)
            )
            style = _STYLES.get(stage.status, "")
            shown = self._progress.tasks[task]
            length = shown.total or 1
            done = stage.status == "succeeded"
            self._progress.update(
                task,
                total=length if done else shown.total,
                completed=length if done else shown.completed,
                description=f"[{style}]{_LABELS[name]}[/]" if style else _LABELS[name],
                note=f"{stage.status} {note}".rstrip(),
            )
            self._progress.stop_task(task)

    def progress(self, data: dict[str, Any]) -> None:
        task = self._tasks["train"]
        if self._status.get("train") != "running":
            return
        epoch = data.get("epoch")
        note = (
            f"step {data.get('step')}  loss {loss_text(data.get('loss'))}  "
            f"{data.get('samples_per_s', 0):.0f} samples/s"
        )
        if self._epochs is not None and isinstance(epoch, int):
            self._progress.update(task, completed=min(epoch, self._epochs), note=note)
        else:
            self._progress.update(task, note=note)

    def refused(self, refused: PipelineRefused) -> None:
        self._progress.console.print(f"refused {refused}", markup=False, style="red")


@contextmanager
def report_for_terminal(spec: PipelineSpec | None) -> Iterator[Report]:
    """Bars while following a pipeline on a terminal; elsewhere (a pipe, a log file, a CI
    job), a :class:`~torchrelay.client.LineReport`."""
    if not sys.stdout.isatty():
        yield LineReport()
        return
    columns = (
        SpinnerColumn(finished_text=" "),
        TextColumn("{task.description:9s}"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}", markup=False),
    )
    with Progress(*columns, console=Console(highlight=False)) as bars:
        yield BarReport(bars, planned_epochs(spec))
