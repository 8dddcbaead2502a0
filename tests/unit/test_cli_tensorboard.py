"""What `torchrelay tensorboard` shows, without starting TensorBoard: runs by their ids, or
one sweep's trials side by side, one short name each (issue 19)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from torchrelay.cli.history import board_folders, sweep_histories, trials_on_storage
from torchrelay.shared.events.data import DatasetRef, TrainJobSpec
from torchrelay.shared.events.sweep import SweepSpec
from torchrelay.shared.storage.layout import Layout
from torchrelay.shared.sweep_state import SweepRecord, new_sweep

NOW = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)


def with_history(root: Path, run_id: str) -> Path:
    """A run whose rank 0 wrote history in its first attempt."""
    attempt = Layout(root).attempt_history(run_id, 0)
    attempt.mkdir(parents=True)
    (attempt / "events.out.tfevents.1.host").write_bytes(b"")
    return Layout(root).history(run_id)


def without_history(root: Path, run_id: str) -> None:
    """A run that started but reported nothing yet."""
    Layout(root).logs(run_id).mkdir(parents=True)


def a_sweep(sweep_id: str, trials: int) -> SweepRecord:
    spec = SweepSpec.model_validate(
        {
            "space": {"lr": {"type": "choice", "values": [10.0**-k for k in range(trials)]}},
            "algorithm": "grid",
            "objective": {"metric": "accuracy", "direction": "maximize"},
            "max_trials": trials,
        }
    )
    job = TrainJobSpec(
        entrypoint="m:train", model_name="digits", dataset=DatasetRef(name="digits", version="d1")
    )
    return new_sweep(sweep_id, spec, job, NOW)


def test_a_sweeps_trials_with_history_are_shown_side_by_side_in_trial_order(
    tmp_path: Path,
) -> None:
    record = a_sweep("p1", 4)
    for index in (3, 0, 2):
        with_history(tmp_path, f"p1.trial-{index}")
    without_history(tmp_path, "p1.trial-1")
    asked: list[str] = []

    def from_platform(sweep_id: str) -> SweepRecord | None:
        asked.append(sweep_id)
        return record

    folders = board_folders(tmp_path, ["p1"], from_platform)
    assert asked == ["p1"]
    assert list(folders) == ["trial-0", "trial-2", "trial-3"]
    assert folders["trial-2"] == Layout(tmp_path).history("p1.trial-2")
    assert all(":" not in name and "," not in name for name in folders)


def test_the_record_names_the_trials_even_where_run_ids_look_alike(tmp_path: Path) -> None:
    """Only the record's runs count: another sweep's, or a stray run, is not a trial."""
    record = a_sweep("p1", 2)
    with_history(tmp_path, "p1.trial-0")
    with_history(tmp_path, "p1.trial-7")  # not in the record
    assert list(board_folders(tmp_path, ["p1"], lambda _: record)) == ["trial-0"]


def test_without_a_platform_to_ask_the_trials_are_found_by_their_run_ids(tmp_path: Path) -> None:
    for run_id in ("p1.trial-10", "p1.trial-2", "p1.trial-01", "p10.trial-0", "p1.train"):
        with_history(tmp_path, run_id)
    without_history(tmp_path, "p1.trial-3")
    assert trials_on_storage(tmp_path, "p1") == {
        2: "p1.trial-2",
        3: "p1.trial-3",
        10: "p1.trial-10",
    }
    assert list(board_folders(tmp_path, ["p1"], None)) == ["trial-2", "trial-10"]
    assert list(board_folders(tmp_path, ["p1"], lambda _: None)) == ["trial-2", "trial-10"]


def test_a_run_id_is_shown_as_the_run_it_names_not_asked_about_as_a_sweep(
    tmp_path: Path,
) -> None:
    with_history(tmp_path, "p1.trial-0")

    def never(sweep_id: str) -> SweepRecord | None:
        raise AssertionError(f"asked about {sweep_id}")

    assert board_folders(tmp_path, ["p1.trial-0"], never) == {
        "p1.trial-0": Layout(tmp_path).history("p1.trial-0")
    }


def test_a_sweep_whose_trials_have_no_history_yet_says_so(tmp_path: Path) -> None:
    without_history(tmp_path, "p1.trial-0")
    with pytest.raises(LookupError) as nothing:
        sweep_histories(tmp_path, "p1", {0: "p1.trial-0", 1: "p1.trial-1"})
    assert str(nothing.value.args[0]) == (
        "sweep p1: none of its 2 trials has history yet: rank 0 of each trial's run writes it "
        "as it trains"
    )


def test_an_id_that_is_neither_a_run_nor_a_sweep_is_an_unknown_run(tmp_path: Path) -> None:
    with_history(tmp_path, "p1.train")
    with pytest.raises(LookupError, match="no run nope under "):
        board_folders(tmp_path, ["nope"], lambda _: None)
