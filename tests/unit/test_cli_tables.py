"""Tables in a pipe: plain aligned columns, one row a line, nothing cut, no trailing blanks;
a sweep's trials as such a table, best first."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import pytest

from torchrelay.cli.base import show_table
from torchrelay.cli.pipelines import show_sweep
from torchrelay.client import sweep_report
from torchrelay.shared.events.data import DatasetRef, TrainJobSpec
from torchrelay.shared.events.sweep import SweepSpec
from torchrelay.shared.sweep_state import (
    SweepRecord,
    conclude,
    end_trial,
    fill_slots,
    new_sweep,
)


def test_a_table_aligns_columns_under_their_headings(capsys: pytest.CaptureFixture[str]) -> None:
    show_table([{"model": "digits", "status": "deployed"}, {"model": "a", "status": "x"}])
    assert capsys.readouterr().out.splitlines() == [
        " MODEL   STATUS",
        " digits  deployed",
        " a       x",
    ]


def test_a_wide_row_is_never_cut_or_folded(capsys: pytest.CaptureFixture[str]) -> None:
    wide = "x" * 300
    show_table([{"endpoint": wide, "status": "deployed"}], title="deployments")
    assert capsys.readouterr().out.splitlines() == [
        "DEPLOYMENTS",
        f" {'ENDPOINT':300s}  STATUS",
        f" {wide}  deployed",
    ]


def test_an_empty_table_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    show_table([])
    assert capsys.readouterr().out == "  (none)\n"


# --- a sweep's trials (`torchrelay status SWEEP`) ------------------------------------------------

NOW = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
JOB = TrainJobSpec(
    entrypoint="m:train", model_name="digits", dataset=DatasetRef(name="digits", version="d1")
)


def a_sweep(direction: str = "maximize") -> SweepRecord:
    """Four trials over lr, two at once, all started: none has ended yet."""
    spec = SweepSpec.model_validate(
        {
            "space": {"lr": {"type": "choice", "values": [0.3, 0.03, 0.003, 0.0003]}},
            "algorithm": "grid",
            "objective": {"metric": "accuracy", "direction": direction},
            "max_trials": 4,
            "parallel": 2,
        }
    )
    record = fill_slots(new_sweep("p1", spec, JOB, NOW), NOW)
    record = end_trial(record, 0, NOW, objective=None, failure="loss is nan")
    record = end_trial(record, 1, NOW, objective=0.95, model_version="m1")
    return fill_slots(record, NOW)


def stopped(record: SweepRecord, index: int, objective: float, reason: str) -> SweepRecord:
    asked = [
        t.model_copy(update={"stop_requested": reason}) if t.index == index else t
        for t in record.trials
    ]
    return end_trial(
        record.model_copy(update={"trials": asked}), index, NOW, objective=objective, failure="x"
    )


def test_a_sweeps_trials_are_a_table_best_first_the_best_marked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    record = a_sweep()
    record = end_trial(record, 2, NOW, objective=0.97, model_version="m2")
    record = stopped(record, 3, 0.41, "median stopping: below the median")
    record = conclude(record, NOW)
    show_sweep(record)
    assert capsys.readouterr().out.splitlines() == [
        "sweep p1: completed, grid, 4 of 4 trials planned (2 completed, 1 stopped, 1 failed), "
        "2 at once; best: trial 2 (accuracy 0.97)",
        " TRIAL  STATUS     LR      ACCURACY (MAXIMIZE)  RUN         REASON",
        " 2*     completed  0.003   0.97                 p1.trial-2",
        " 1      completed  0.03    0.95                 p1.trial-1",
        " 3      stopped    0.0003  0.41                 p1.trial-3  median stopping: below "
        "the median",
        " 0      failed     0.3                          p1.trial-0  loss is nan",
        "  * best trial",
    ]


def test_a_running_sweep_marks_its_best_completed_trial_so_far(
    capsys: pytest.CaptureFixture[str],
) -> None:
    record = a_sweep(direction="minimize")
    record = end_trial(record, 2, NOW, objective=0.5, model_version="m2")
    show_sweep(record)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "sweep p1: running, grid, 4 of 4 trials planned (1 running, 2 completed, 1 failed), "
        "2 at once; leading: trial 2 (accuracy 0.5)"
    )
    assert [line.split()[:2] for line in lines[2:-1]] == [
        ["2*", "completed"],
        ["1", "completed"],
        ["0", "failed"],
        ["3", "running"],
    ]
    assert lines[1].split()[3:5] == ["ACCURACY", "(MINIMIZE)"]
    assert lines[-1] == "  * best completed trial so far"


def test_a_sweep_without_a_completed_trial_marks_none(capsys: pytest.CaptureFixture[str]) -> None:
    record = fill_slots(a_sweep().model_copy(update={"trials": a_sweep().trials[:1]}), NOW)
    show_sweep(record)
    out = capsys.readouterr().out
    assert "*" not in out
    assert "(1 failed)" in out
    assert "best" not in out
    assert "leading" not in out


def test_the_json_report_lists_the_trials_best_first_without_nan() -> None:
    record = a_sweep()
    record = stopped(record, 2, math.nan, "median stopping: diverged")
    report = sweep_report(record)
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    assert (report["status"], report["best"], report["leading"]) == ("running", None, 1)
    assert report["objective"] == {"metric": "accuracy", "direction": "maximize"}
    assert report["counts"] == {
        "pending": 0,
        "running": 1,
        "completed": 1,
        "stopped": 1,
        "failed": 1,
        "cancelled": 0,
    }
    assert [(t["index"], t["objective"], t["reason"]) for t in report["trials"]] == [
        (1, 0.95, None),
        (0, None, "loss is nan"),
        (2, None, "median stopping: diverged"),
        (3, None, None),
    ]
    assert report["trials"][0]["params"] == {"lr": 0.03}
    assert report["trials"][0]["run_id"] == "p1.trial-1"
