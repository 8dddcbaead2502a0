"""Sweeps: which trials a spec yields, which specs are refused and why, when median stopping
stops a trial, and which trial wins."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from torchrelay.shared.errors import ConfigError
from torchrelay.shared.sweeps import (
    EarlyStopping,
    SweepSpec,
    best,
    should_stop,
    sweep_refusal,
    trials,
    value_at,
)


def sweep(**fields: Any) -> SweepSpec:
    raw: dict[str, Any] = {
        "space": {"lr": {"type": "choice", "values": [0.1, 0.03, 0.01, 0.003]}},
        "algorithm": "grid",
        "objective": {"metric": "accuracy", "direction": "maximize"},
        "max_trials": 4,
    }
    return SweepSpec.model_validate(raw | fields)


def refusal(**fields: Any) -> str:
    """Why the sweep is refused: as it is decoded (one field at a time), else by
    :func:`sweep_refusal` (what relates fields), as a submission is."""
    try:
        spec = sweep(**fields)
    except ValidationError as caught:
        return "; ".join(str(error["msg"]) for error in caught.errors())
    reason = sweep_refusal(spec)
    assert reason is not None, f"{fields} was accepted"
    return reason


# --- trials -----------------------------------------------------------------------------------


def test_a_grid_of_four_learning_rates_yields_exactly_those_four_in_order() -> None:
    assert trials(sweep()) == [{"lr": 0.1}, {"lr": 0.03}, {"lr": 0.01}, {"lr": 0.003}]


def test_a_grid_is_the_product_first_parameter_slowest_cut_to_max_trials() -> None:
    spec = sweep(
        space={
            "lr": {"type": "choice", "values": [0.1, 0.01]},
            "batch": {"type": "int", "low": 16, "high": 64, "step": 16},
        },
        max_trials=5,
    )
    assert trials(spec) == [
        {"lr": 0.1, "batch": 16},
        {"lr": 0.1, "batch": 32},
        {"lr": 0.1, "batch": 48},
        {"lr": 0.1, "batch": 64},
        {"lr": 0.01, "batch": 16},
    ]


def test_choice_values_keep_their_types() -> None:
    spec = sweep(space={"opt": {"type": "choice", "values": ["adam", True, 3, 0.5]}})
    assert [trial["opt"] for trial in trials(spec)] == ["adam", True, 3, 0.5]
    assert [type(trial["opt"]) for trial in trials(spec)] == [str, bool, int, float]


RANDOM_SPACE = {
    "lr": {"type": "loguniform", "low": 1e-5, "high": 1e-1},
    "dropout": {"type": "uniform", "low": 0.0, "high": 0.5},
    "layers": {"type": "int", "low": 1, "high": 9, "step": 2},
    "opt": {"type": "choice", "values": ["adam", "sgd"]},
}


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32), max_trials=st.integers(1, 40))
def test_random_trials_are_reproducible_and_within_bounds(seed: int, max_trials: int) -> None:
    spec = sweep(algorithm="random", space=RANDOM_SPACE, seed=seed, max_trials=max_trials)
    drawn = trials(spec)
    assert drawn == trials(spec.model_copy())
    assert len(drawn) == max_trials
    for trial in drawn:
        assert 1e-5 <= float(trial["lr"]) <= 1e-1
        assert 0.0 <= float(trial["dropout"]) <= 0.5
        assert trial["layers"] in {1, 3, 5, 7, 9}
        assert trial["opt"] in {"adam", "sgd"}


def test_random_trials_depend_on_the_seed_and_nothing_else() -> None:
    # Pinned values: a draw that depended on the process (hash seed, set order) or on a changed
    # drawing order would move them, and a replica taking over a sweep would plan other trials.
    assert trials(sweep(algorithm="random", space=RANDOM_SPACE, max_trials=2)) == [
        {"lr": 0.02386093216690149, "dropout": 0.37897720147015124, "layers": 7, "opt": "adam"},
        {"lr": 0.0001085592917212182, "dropout": 0.25563736068430426, "layers": 7, "opt": "sgd"},
    ]
    assert trials(sweep(algorithm="random", space=RANDOM_SPACE, seed=1, max_trials=8)) != (
        trials(sweep(algorithm="random", space=RANDOM_SPACE, seed=0, max_trials=8))
    )


def test_loguniform_draws_are_spread_evenly_over_the_decades() -> None:
    spec = sweep(
        algorithm="random",
        space={"lr": {"type": "loguniform", "low": 1e-4, "high": 1.0}},
        max_trials=400,
    )
    decades = [math.floor(math.log10(float(trial["lr"]))) for trial in trials(spec)]
    # Four decades, ~100 draws each; a uniform draw would put ~90% in the top one.
    for decade in (-4, -3, -2, -1):
        assert 60 <= decades.count(decade) <= 140


def test_a_bayesian_sweep_has_no_trials_to_list_ahead() -> None:
    spec = sweep(algorithm="bayesian", space=RANDOM_SPACE)
    with pytest.raises(ConfigError, match="suggested by Optuna one at a time"):
        trials(spec)


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("space", "reason"),
    [
        ({"lr": {"type": "choice", "values": []}}, "choice needs at least one value"),
        ({"lr": {"type": "int", "low": 5, "high": 1}}, "int needs low <= high, got low=5, high=1"),
        ({"lr": {"type": "uniform", "low": 0.5, "high": 0.1}}, "uniform needs low < high"),
        ({"lr": {"type": "uniform", "low": "0.1", "high": 1}}, "low must be a number, got '0.1'"),
        ({"lr": {"type": "uniform", "low": 0, "high": True}}, "high must be a number, got True"),
        ({"lr": {"type": "uniform", "low": 0, "high": math.inf}}, "high must be finite"),
        ({"lr": {"type": "loguniform", "low": math.nan, "high": 1}}, "low must be finite"),
        ({"lr": {"type": "loguniform", "low": 0, "high": 1}}, "greater than 0"),
        ({"lr": {"type": "choice", "values": [0.1, math.nan]}}, "choice values must be finite"),
        ({"n": {"type": "int", "low": 1, "high": 4, "step": 0}}, "greater than or equal to 1"),
        ({"n": {"type": "int", "low": 1.5, "high": 4}}, "low must be an integer, got 1.5"),
        ({"lr": {"type": "normal", "mean": 0}}, "does not match any of the expected tags"),
        ({"learning-rate": {"type": "int", "low": 1, "high": 2}}, "should match pattern"),
    ],
)
def test_a_bad_space_is_refused_with_its_reason(space: dict[str, Any], reason: str) -> None:
    assert reason in refusal(algorithm="random", space=space)


def test_an_empty_space_is_refused() -> None:
    assert "at least 1 item" in refusal(space={})


def test_a_grid_over_a_continuous_range_is_refused_naming_it() -> None:
    space = {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1}}
    assert (
        "grid needs choice or int parameters; lr is a continuous range: list its values as a "
        "choice, or use random" in refusal(space=space)
    )


def test_more_parallel_trials_than_trials_is_refused() -> None:
    assert "parallel (5) cannot exceed max_trials (4)" in refusal(parallel=5)


def test_an_integral_json_number_is_an_integer_bound() -> None:
    spec = sweep(space={"n": {"type": "int", "low": 1.0, "high": 3e0}})
    assert trials(spec) == [{"n": 1}, {"n": 2}, {"n": 3}]


# --- median stopping --------------------------------------------------------------------------

RULE = EarlyStopping(warmup_steps=20, min_trials=3)
# Three completed trials whose accuracy climbs to 0.9; the median at step 10 is 0.5, at 30 0.8.
COMPLETED = [
    [(10, 0.4), (20, 0.6), (30, 0.7), (40, 0.85)],
    [(10, 0.5), (20, 0.7), (30, 0.8), (40, 0.9)],
    [(10, 0.6), (20, 0.8), (30, 0.9), (40, 0.95)],
]


def test_a_diverging_trial_is_stopped_after_warmup_naming_the_median() -> None:
    diverging = [(10, 0.2), (20, 0.15), (30, 0.1)]
    assert should_stop(diverging, COMPLETED, RULE, "maximize") == (
        "median stopping: objective 0.1 at step 30 is worse than the median 0.8 of 3 completed "
        "trials at that step (maximize)"
    )


def test_a_trial_is_not_judged_during_its_warmup() -> None:
    assert should_stop([(10, 0.2)], COMPLETED, RULE, "maximize") is None
    assert should_stop([(10, 0.2), (20, 0.15)], COMPLETED, RULE, "maximize") is not None


def test_nothing_is_stopped_before_min_trials_trials_completed() -> None:
    assert should_stop([(30, 0.1)], COMPLETED[:2], RULE, "maximize") is None


def test_a_trial_at_or_above_the_median_goes_on() -> None:
    assert should_stop([(30, 0.8)], COMPLETED, RULE, "maximize") is None
    assert should_stop([(30, 0.95)], COMPLETED, RULE, "maximize") is None


def test_the_direction_decides_what_worse_means() -> None:
    losses = [[(step, 1 - value) for step, value in history] for history in COMPLETED]
    # Median loss at step 30: 0.2. A loss of 0.9 is worse, 0.05 better.
    assert should_stop([(30, 0.9)], losses, RULE, "minimize") is not None
    assert should_stop([(30, 0.05)], losses, RULE, "minimize") is None
    assert should_stop([(30, 0.05)], losses, RULE, "maximize") is not None


def test_completed_trials_count_with_their_last_value_at_or_before_the_step() -> None:
    # Step 35 falls between reports: the completed trials count at 0.7, 0.8 and 0.9.
    assert should_stop([(35, 0.79)], COMPLETED, RULE, "maximize") is not None
    assert should_stop([(35, 0.8)], COMPLETED, RULE, "maximize") is None


def test_completed_trials_that_reported_nothing_that_early_do_not_count() -> None:
    late = [[(25, 0.9), (40, 0.95)]] * 3
    assert should_stop([(20, 0.1)], late, RULE, "maximize") is None


def test_a_nan_objective_is_worse_than_any_median() -> None:
    assert should_stop([(30, math.nan)], COMPLETED, RULE, "minimize") is not None


def test_a_report_after_a_restart_replaces_the_earlier_one_at_the_same_step() -> None:
    assert value_at([(10, 0.5), (20, 0.9), (10, 0.4)], 15) == 0.4
    assert value_at([(10, 0.5), (20, math.nan)], 25) == 0.5
    assert value_at([(10, 0.5)], 5) is None


# --- the best trial ---------------------------------------------------------------------------


def test_best_is_the_highest_when_maximizing_and_the_lowest_when_minimizing() -> None:
    results = {0: 0.91, 1: 0.97, 2: None, 3: 0.88}
    assert best(results, "maximize") == 1
    assert best(results, "minimize") == 3


def test_best_breaks_ties_to_the_lowest_trial_index() -> None:
    assert best({3: 0.9, 1: 0.9, 2: 0.5}, "maximize") == 1
    assert best({3: 0.5, 1: 0.9, 2: 0.5}, "minimize") == 2


def test_best_leaves_out_trials_without_a_value() -> None:
    assert best({0: None, 1: math.nan, 2: 0.1}, "maximize") == 2
    assert best({0: None}, "minimize") is None
    assert best({}, "maximize") is None
