"""Promotion gates: which trained model may replace the serving one, and why not."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from torchrelay.services.serve.domain import judge_gate
from torchrelay.shared.events.data import PromotionGate

values = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


def gate(**fields: object) -> PromotionGate:
    return PromotionGate.model_validate({"metric": "accuracy", **fields})


def test_a_model_worse_than_the_serving_one_is_refused_naming_both_values() -> None:
    verdict = judge_gate(
        gate(better_than_serving=True), "v2", {"accuracy": 0.9475}, "v1", {"accuracy": 0.9525}
    )
    assert verdict.refusal == "accuracy 0.9475 is not better than 0.9525 of the serving version v1"
    assert verdict.detail == {
        "gate": "refused",
        "gate_metric": "accuracy",
        "candidate_value": 0.9475,
        "serving_version": "v1",
        "serving_value": 0.9525,
    }


def test_a_better_model_passes_and_the_detail_says_what_was_compared() -> None:
    verdict = judge_gate(
        gate(better_than_serving=True), "v2", {"accuracy": 0.96}, "v1", {"accuracy": 0.9525}
    )
    assert verdict.passed
    assert verdict.detail == {
        "gate": "passed",
        "gate_metric": "accuracy",
        "candidate_value": 0.96,
        "serving_version": "v1",
        "serving_value": 0.9525,
    }


def test_equal_is_not_better() -> None:
    verdict = judge_gate(
        gate(better_than_serving=True), "v2", {"accuracy": 0.95}, "v1", {"accuracy": 0.95}
    )
    assert verdict.refusal == "accuracy 0.95 is not better than 0.95 of the serving version v1"


def test_below_min_is_refused_and_min_itself_passes() -> None:
    below = judge_gate(gate(min=0.9), "v1", {"accuracy": 0.82}, None, None)
    assert below.refusal == "accuracy 0.82 is below the gate's min 0.9"
    assert below.detail == {"gate": "refused", "gate_metric": "accuracy", "candidate_value": 0.82}
    assert judge_gate(gate(min=0.9), "v1", {"accuracy": 0.9}, None, None).passed


def test_above_max_is_refused_and_max_itself_passes() -> None:
    loss = PromotionGate(metric="loss", max=0.3)
    assert judge_gate(loss, "v1", {"loss": 0.5}, None, None).refusal == (
        "loss 0.5 is above the gate's max 0.3"
    )
    assert judge_gate(loss, "v1", {"loss": 0.3}, None, None).passed


def test_a_metric_the_model_does_not_report_refuses_the_rollout_naming_what_it_reports() -> None:
    verdict = judge_gate(
        PromotionGate(metric="f1", min=0.5), "v1", {"loss": 0.1, "accuracy": 0.9}, None, None
    )
    assert verdict.refusal == (
        "the model does not report metric 'f1' (it reports: accuracy, loss); the rollout is refused"
    )
    assert verdict.detail == {"gate": "refused", "gate_metric": "f1"}
    nothing = judge_gate(PromotionGate(metric="f1", min=0.5), "v1", {}, None, None)
    assert nothing.refusal is not None
    assert "(it reports: none)" in nothing.refusal


def test_a_metric_that_is_not_a_number_is_refused_even_with_no_bound_it_could_fail() -> None:
    # NaN compares false with everything: it would slip past min, max and better_than_serving.
    verdict = judge_gate(
        gate(min=0.5, better_than_serving=True), "v2", {"accuracy": math.nan}, None, None
    )
    assert verdict.refusal == "accuracy is nan, not a value a gate can compare"


def test_every_failed_condition_is_named() -> None:
    verdict = judge_gate(
        gate(min=0.9, better_than_serving=True), "v2", {"accuracy": 0.8}, "v1", {"accuracy": 0.85}
    )
    assert verdict.refusal == (
        "accuracy 0.8 is below the gate's min 0.9; "
        "accuracy 0.8 is not better than 0.85 of the serving version v1"
    )


@pytest.mark.parametrize(
    ("serving", "metrics", "note"),
    [
        (None, None, "nothing serves yet: better_than_serving passes"),
        ("v1", {"loss": 0.2}, "the serving version v1 does not report accuracy"),
        ("v1", None, "the metrics of the serving version v1 could not be read"),
        ("v1", {"accuracy": math.nan}, "the serving version v1 reports accuracy nan"),
        ("v2", {"accuracy": 0.99}, "v2 is the serving version: better_than_serving passes"),
    ],
)
def test_better_than_serving_passes_when_there_is_nothing_to_compare_and_says_so(
    serving: str | None, metrics: dict[str, float] | None, note: str
) -> None:
    verdict = judge_gate(gate(better_than_serving=True), "v2", {"accuracy": 0.5}, serving, metrics)
    assert verdict.passed
    assert note in str(verdict.detail["gate_note"])
    assert verdict.detail["candidate_value"] == 0.5


def test_a_waived_comparison_still_applies_min() -> None:
    verdict = judge_gate(
        gate(min=0.9, better_than_serving=True), "v1", {"accuracy": 0.5}, None, None
    )
    assert verdict.refusal == "accuracy 0.5 is below the gate's min 0.9"


def test_lower_is_better_flips_the_comparison_with_the_serving_version_only() -> None:
    loss = PromotionGate(metric="loss", min=0.1, better_than_serving=True, higher_is_better=False)
    assert judge_gate(loss, "v2", {"loss": 0.2}, "v1", {"loss": 0.3}).passed
    assert judge_gate(loss, "v2", {"loss": 0.4}, "v1", {"loss": 0.3}).refusal == (
        "loss 0.4 is not better than 0.3 of the serving version v1 (lower is better)"
    )
    # min keeps its plain meaning: the loss must still be at least 0.1.
    assert judge_gate(loss, "v2", {"loss": 0.05}, "v1", {"loss": 0.3}).refusal == (
        "loss 0.05 is below the gate's min 0.1"
    )


@given(value=values, bound=values)
def test_min_passes_exactly_the_values_at_or_above_it(value: float, bound: float) -> None:
    verdict = judge_gate(gate(min=bound), "v1", {"accuracy": value}, None, None)
    assert verdict.passed is (value >= bound)


@given(value=values, bound=values)
def test_max_passes_exactly_the_values_at_or_below_it(value: float, bound: float) -> None:
    verdict = judge_gate(gate(max=bound), "v1", {"accuracy": value}, None, None)
    assert verdict.passed is (value <= bound)


@given(value=values, served=values, higher_is_better=st.booleans())
def test_better_than_serving_passes_exactly_the_strictly_better_values(
    value: float, served: float, higher_is_better: bool
) -> None:
    rule = gate(better_than_serving=True, higher_is_better=higher_is_better)
    verdict = judge_gate(rule, "v2", {"accuracy": value}, "v1", {"accuracy": served})
    assert verdict.passed is (value > served if higher_is_better else value < served)
    assert verdict.detail["candidate_value"] == value
    assert verdict.detail["serving_value"] == served


def test_a_gate_that_asks_nothing_is_not_a_gate() -> None:
    with pytest.raises(ValidationError, match="a gate needs min, max or better_than_serving"):
        PromotionGate(metric="accuracy")
