"""How a run's attempts read as one curve for the Python client (:func:`run_history`): a
resumed attempt's values replace what earlier attempts reported from its first step on."""

from __future__ import annotations

from torchrelay.client import merge_attempts


def test_one_attempt_is_its_own_history_by_step() -> None:
    attempt = {"train/loss": [(20, 1.5), (10, 2.0)], "train/lr": [(10, 0.01)]}
    assert merge_attempts([attempt]) == {
        "train/loss": [(10, 2.0), (20, 1.5)],
        "train/lr": [(10, 0.01)],
    }


def test_a_resumed_attempt_replaces_the_steps_it_redid() -> None:
    died = {"train/loss": [(10, 2.0), (20, 1.5), (30, 1.2), (40, 1.1)]}
    resumed = {"train/loss": [(30, 1.25), (40, 1.05), (50, 0.9)]}
    assert merge_attempts([died, resumed]) == {
        "train/loss": [(10, 2.0), (20, 1.5), (30, 1.25), (40, 1.05), (50, 0.9)]
    }


def test_tags_are_merged_each_on_their_own() -> None:
    """The export is only written by the attempt that finished; the first attempt's other
    tags stay where the resumed one did not report them."""
    died = {"train/loss": [(10, 2.0), (20, 1.5)], "metrics/accuracy": [(20, 0.5)]}
    finished = {"train/loss": [(20, 1.4), (30, 1.0)], "export/accuracy": [(30, 0.9)]}
    assert merge_attempts([died, finished]) == {
        "train/loss": [(10, 2.0), (20, 1.4), (30, 1.0)],
        "metrics/accuracy": [(20, 0.5)],
        "export/accuracy": [(30, 0.9)],
    }


def test_no_attempts_and_empty_series_give_nothing() -> None:
    assert merge_attempts([]) == {}
    assert merge_attempts([{"train/loss": []}]) == {}
