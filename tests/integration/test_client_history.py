"""A run's history through the Python client API: :func:`run_history` reads back what the
worker's own writer (:class:`RunHistory`, rank 0's) put on storage, every attempt as one curve,
and says clearly when there is no such run or no history."""

from __future__ import annotations

from pathlib import Path

import pytest

from torchrelay.client import HistoryNotFound, history_attempts, run_history
from torchrelay.services.train.worker.history import RunHistory
from torchrelay.shared.errors import UnsafePath
from torchrelay.shared.storage import Layout


def write(layout: Layout, run_id: str, attempt: int, points: dict[int, dict[str, float]]) -> None:
    """What rank 0 writes as it reports: scalars by step, into the attempt's folder."""
    history = RunHistory(layout.attempt_history(run_id, attempt))
    for step, values in points.items():
        history.scalars(step, values)
    history.close()


def test_a_runs_history_reads_back_as_the_worker_wrote_it(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    write(
        layout,
        "digits-1.train",
        0,
        {
            10: {"train/loss": 2.25, "train/lr": 0.003},
            20: {"train/loss": 1.5, "train/lr": 0.003},
            22: {"export/accuracy": 0.875},
        },
    )
    assert run_history(tmp_path, "digits-1.train") == {
        "train/loss": [(10, 2.25), (20, 1.5)],
        "train/lr": [(10, pytest.approx(0.003)), (20, pytest.approx(0.003))],
        "export/accuracy": [(22, 0.875)],
    }
    assert run_history(str(tmp_path), "digits-1.train")["train/loss"] == [(10, 2.25), (20, 1.5)]


def test_a_resumed_run_reads_as_one_curve_its_last_attempt_wins_the_redone_steps(
    tmp_path: Path,
) -> None:
    layout = Layout(tmp_path)
    loss = "train/loss"
    write(layout, "r", 0, {10: {loss: 2.0}, 20: {loss: 1.5}, 30: {loss: 1.2}})
    write(layout, "r", 1, {30: {"train/loss": 1.25}, 40: {"train/loss": 1.0}})
    write(layout, "r", 10, {40: {"train/loss": 0.75}})  # attempt 10 comes after 1, not before 2
    assert [p.name for p in history_attempts(tmp_path, "r")] == [
        "attempt-0",
        "attempt-1",
        "attempt-10",
    ]
    assert run_history(tmp_path, "r") == {
        "train/loss": [(10, 2.0), (20, 1.5), (30, 1.25), (40, 0.75)]
    }


def test_an_unknown_run_is_named_with_where_it_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(HistoryNotFound, match=r"no run nope\.train under .*runs"):
        run_history(tmp_path, "nope.train")
    assert not (tmp_path / "runs").exists(), "reading creates nothing"


def test_a_run_without_history_says_so(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    layout.logs("early").mkdir(parents=True)  # started: logs, but no progress reported yet
    (layout.history("early") / "attempt-0").mkdir(parents=True)  # and an empty attempt folder
    (layout.history("early") / "notes").mkdir()  # not an attempt: ignored
    with pytest.raises(HistoryNotFound, match=r"run early has no history .*tensorboard"):
        run_history(tmp_path, "early")


@pytest.mark.parametrize("run_id", ["../outside", "a/b", "", ".."])
def test_a_run_id_that_is_not_one_path_segment_is_refused(tmp_path: Path, run_id: str) -> None:
    with pytest.raises(UnsafePath, match="run id"):
        run_history(tmp_path / "storage", run_id)
    assert not (tmp_path / "storage").exists()
