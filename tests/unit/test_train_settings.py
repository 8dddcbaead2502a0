"""The train service's settings: which training code it may run."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from torchrelay.services.train.settings import TrainSettings
from torchrelay.shared.runtime.main import describe_settings_error


def test_by_default_only_the_bundled_examples_may_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHRELAY_TRAIN_ENTRYPOINTS", raising=False)
    assert TrainSettings().train.entrypoints == ("torchrelay.services.train.examples",)


@pytest.mark.parametrize(
    ("value", "prefixes"),
    [
        ("a.b,c.d", ("a.b", "c.d")),
        (
            " team.trainers , torchrelay.services.train.examples ,",
            ("team.trainers", "torchrelay.services.train.examples"),
        ),
        ("solo", ("solo",)),
        ("", ()),
    ],
)
def test_the_environment_gives_comma_separated_prefixes(
    monkeypatch: pytest.MonkeyPatch, value: str, prefixes: tuple[str, ...]
) -> None:
    monkeypatch.setenv("TORCHRELAY_TRAIN_ENTRYPOINTS", value)
    assert TrainSettings().train.entrypoints == prefixes


@pytest.mark.parametrize("value", ["team.trainers:train", "team..trainers", "team/trainers"])
def test_a_prefix_that_is_not_a_module_name_is_a_settings_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("TORCHRELAY_TRAIN_ENTRYPOINTS", value)
    with pytest.raises(ValidationError) as caught:
        TrainSettings()
    message = describe_settings_error(caught.value)
    assert "TORCHRELAY_TRAIN_ENTRYPOINTS" in message
    assert repr(value) in message
    assert "without ':function'" in message


def test_ranks_wait_for_each_other_and_for_collectives_as_long_as_production_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("RENDEZVOUS_TIMEOUT_S", "COLLECTIVE_TIMEOUT_S"):
        monkeypatch.delenv(f"TORCHRELAY_TRAIN_{name}", raising=False)
    defaults = TrainSettings().train
    assert (defaults.rendezvous_timeout_s, defaults.collective_timeout_s) == (600.0, 1800.0)
    monkeypatch.setenv("TORCHRELAY_TRAIN_RENDEZVOUS_TIMEOUT_S", "900")
    monkeypatch.setenv("TORCHRELAY_TRAIN_COLLECTIVE_TIMEOUT_S", "3600")
    chosen = TrainSettings().train
    assert (chosen.rendezvous_timeout_s, chosen.collective_timeout_s) == (900.0, 3600.0)


def test_a_timeout_that_is_not_positive_is_a_settings_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TORCHRELAY_TRAIN_RENDEZVOUS_TIMEOUT_S", "0")
    with pytest.raises(ValidationError) as caught:
        TrainSettings()
    assert "TORCHRELAY_TRAIN_RENDEZVOUS_TIMEOUT_S" in describe_settings_error(caught.value)


def test_a_simulated_duration_range_that_is_upside_down_is_a_settings_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TORCHRELAY_TRAIN_SIMULATED_MIN_DURATION_S", "20")
    monkeypatch.setenv("TORCHRELAY_TRAIN_SIMULATED_MAX_DURATION_S", "10")
    with pytest.raises(ValidationError, match="simulated_min_duration_s is more than"):
        TrainSettings()
