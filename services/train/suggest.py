"""A bayesian sweep's next trial, suggested by Optuna's TPE sampler (the ``sweeps`` extra).

The suggestion logic is Optuna's: this module only tells it the space and the trials so far,
from the sweep's record (no Optuna storage: the record in KV is the one truth), and asks for
the next trial's hyperparameters. The sampler is seeded with the sweep's seed and the trial's
index, so what a trial gets depends only on the record it was suggested from.
"""

from __future__ import annotations

import importlib.util
import math
from typing import TYPE_CHECKING, Any

from torchrelay.shared.events.sweep import Choice, IntRange, LogUniform, SpaceParam, Value
from torchrelay.shared.sweep_state import ENDED_WITHOUT_MODEL, Suggest, SweepRecord

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

OPTUNA_MISSING = (
    "a bayesian sweep needs Optuna in the train service: install torchrelay[sweeps] "
    "(or use grid or random)"
)


def suggester() -> Suggest | None:
    """:func:`suggest` when Optuna is installed, else None (a bayesian sweep is refused)."""
    return suggest if importlib.util.find_spec("optuna") is not None else None


def suggest(record: SweepRecord) -> dict[str, Value]:
    import optuna
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spaces = {name: _distribution(param) for name, param in record.spec.space.items()}
    sampler = optuna.samplers.TPESampler(seed=record.spec.seed + len(record.trials))
    study = optuna.create_study(direction=record.spec.objective.direction, sampler=sampler)
    for trial in record.trials:
        value = trial.objective
        if trial.status == "completed" and value is not None and math.isfinite(value):
            state, values = TrialState.COMPLETE, [value]
        elif trial.status in ENDED_WITHOUT_MODEL:
            state, values = TrialState.FAIL, None  # nothing learned of its final value
        else:
            continue  # running: its result is not known yet
        study.add_trial(
            create_trial(
                params=dict(trial.params), distributions=spaces, values=values, state=state
            )
        )
    asked = study.ask(spaces)
    return {name: _value(asked.params[name]) for name in record.spec.space}


def _distribution(param: SpaceParam) -> BaseDistribution:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if isinstance(param, Choice):
        return CategoricalDistribution(list(param.values))
    if isinstance(param, IntRange):
        return IntDistribution(param.low, param.high, step=param.step)
    return FloatDistribution(param.low, param.high, log=isinstance(param, LogUniform))


def _value(value: Any) -> Value:
    if isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"Optuna suggested {value!r}, which is not a hyperparameter value")
