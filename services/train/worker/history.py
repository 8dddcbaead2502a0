"""A run's history for people to look at: rank 0 writes every metric it reports as TensorBoard
scalars under ``runs/<id>/tensorboard/attempt-<a>/``, so a finished run's curves outlive the
monitor's live view (``torchrelay tensorboard RUN_ID`` shows them).

One folder per attempt, on purpose. A resumed attempt starts again at its checkpoint's step, so
the steps between that checkpoint and where the previous attempt died are trained, and reported,
twice. Written into one folder, those steps would hold two values each in one curve, drawn as a
zigzag that looks like training went wrong. Per attempt, TensorBoard draws ``<run>/attempt-0``
and ``<run>/attempt-1`` as two curves on one step axis: the resumed one begins right after the
restored step, and the overlap reads as what it is, work redone after a restart.

Tags: ``train/loss``, ``train/samples_per_s``, ``train/lr`` (``train/lr/group-<i>`` for an
optimizer with several parameter groups), ``metrics/<name>`` for what the code passes to
``step_done(metrics=...)``, and ``export/<name>`` for the metrics ``ctx.export`` records, at the
last step. Writing history never fails training: the first error is logged as a warning and the
history of that attempt stops there (no retry on every step against a broken storage).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

log = structlog.get_logger("torchrelay.train.worker")

FLUSH_EVERY_S = 30
"""The writer's own flush period, so a running job's history is at most this old on storage
(checkpoints, the export and the end flush at once)."""


def _number(value: object) -> float | None:
    """``value`` as a float when it is a real number (a 0-d tensor too), else None."""
    if isinstance(value, bool | str | bytes):
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - a tensor of several values, an odd __float__
        return None


def progress_scalars(
    *,
    loss: object,
    samples_per_s: float,
    metrics: Mapping[str, object],
    learning_rates: Sequence[object],
) -> dict[str, float]:
    """The scalars of one progress report, by tag. Values that are not numbers are left out
    (NaN and infinities stay: a diverging loss is history too)."""
    scalars = {"train/loss": _number(loss), "train/samples_per_s": _number(samples_per_s)}
    if len(learning_rates) == 1:
        scalars["train/lr"] = _number(learning_rates[0])
    else:
        scalars.update({f"train/lr/group-{i}": _number(lr) for i, lr in enumerate(learning_rates)})
    scalars.update({f"metrics/{name}": _number(value) for name, value in metrics.items()})
    return {tag: value for tag, value in scalars.items() if value is not None}


def export_scalars(metrics: Mapping[str, object]) -> dict[str, float]:
    """The exported model's metrics, by tag (``export/<name>``); non-numbers are left out."""
    numbers = {f"export/{name}": _number(value) for name, value in metrics.items()}
    return {tag: value for tag, value in numbers.items() if value is not None}


def learning_rates(optimizer: Any) -> list[object]:
    """Each parameter group's current learning rate (none when there is no optimizer)."""
    if optimizer is None:
        return []
    return [group.get("lr") for group in optimizer.param_groups]


class RunHistory:
    """TensorBoard event files in ``folder``; ``folder=None`` writes nothing (every rank but
    rank 0). The folder and the file appear with the first scalars, not before."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._writer: SummaryWriter | None = None
        self._broken = folder is None

    @property
    def writing(self) -> bool:
        """False for a rank that writes no history, or once writing it has failed."""
        return not self._broken

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self._broken or not values:
            return
        try:
            writer = self._open()
            for tag, value in values.items():
                writer.add_scalar(tag, value, global_step=step)
        except Exception as exc:  # noqa: BLE001 - history is never worth a failed run
            self._give_up("write", exc)

    def flush(self) -> None:
        if self._writer is None or self._broken:
            return
        try:
            self._writer.flush()
        except Exception as exc:  # noqa: BLE001
            self._give_up("flush", exc)

    def close(self) -> None:
        """Flush and close the file; idempotent, never raises."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer.close()
        except Exception as exc:  # noqa: BLE001
            self._give_up("close", exc)

    def _open(self) -> SummaryWriter:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # tensorboard: rank 0 only

            self._writer = SummaryWriter(str(self.folder), flush_secs=FLUSH_EVERY_S)
        return self._writer

    def _give_up(self, action: str, exc: Exception) -> None:
        if not self._broken:
            log.warning(
                "history.unwritable",
                action=action,
                folder=str(self.folder),
                error=repr(exc)[:300],
                effect="this attempt's TensorBoard history stops here; training goes on",
            )
        self._broken = True
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):  # already said why the history stopped
                writer.close()
