"""Hyperparameter sweeps, the pure part: the spec, the trials it yields, median stopping and the
best trial.

No bus, KV or disk here: the pipeline spec, the train service and the monitor build on these
functions, so a sweep's rules are unit-tested once and applied the same way everywhere. Every
function is deterministic: the same spec (and seed) gives the same trials in any process,
whatever Python's hash seed, so a replica that takes over a sweep mid-way recomputes exactly
the trials the dead one had planned.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Iterator, Mapping, Sequence
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from torchrelay.shared.errors import ConfigError
from torchrelay.shared.events.envelope import Data

Value = StrictBool | StrictInt | StrictFloat | Annotated[str, StringConstraints(max_length=256)]
"""One hyperparameter's value in a trial. Strict: ``"0.1"`` stays a string, ``True`` a bool."""


ParamName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=64)]
"""A hyperparameter's name: a Python identifier, as the training function reads it."""

Algorithm = Literal["grid", "random", "bayesian"]
Direction = Literal["maximize", "minimize"]
History = Sequence[tuple[int, float]]
"""A trial's objective as it reported it: ``(step, value)`` points in the order they came."""


# --- the search space -------------------------------------------------------------------------


class _Param(BaseModel):
    """Base of the search-space kinds: :class:`Data`'s rules (frozen, unknown fields and
    non-finite numbers refused) without its catch-all before-validator, which pydantic does not
    allow on the ``type`` field that tells the kinds apart."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @field_validator("low", "high", "step", "values", mode="before", check_fields=False)
    @classmethod
    def _numbers(cls, value: object, info: ValidationInfo) -> object:
        """Refuse what pydantic would convert or report obscurely: a string bound (even
        ``"0.1"``), a bool bound, a NaN or infinity, each with the field it was found in."""
        field = str(info.field_name)  # always set for a field validator
        if field == "values":
            if isinstance(value, list):  # anything else: pydantic says it is not a list
                if not value:
                    raise ValueError("choice needs at least one value")
                for item in value:
                    if isinstance(item, float) and not math.isfinite(item):
                        raise ValueError(f"choice values must be finite, got {item}")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            # pydantic reports a ValueError as the field's error; a TypeError would escape.
            raise ValueError(f"{field} must be a number, got {value!r}")  # noqa: TRY004
        if not math.isfinite(value):
            raise ValueError(f"{field} must be finite, got {value}")
        integer_only = cls.model_fields[field].annotation is int
        if integer_only and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"{field} must be an integer, got {value}")
            return int(value)  # JSON's 1.0 or 1e3: an integer all the same
        return value


class Choice(_Param):
    """One of a list of values (numbers, strings or bools), taken in the order given."""

    type: Literal["choice"]
    values: list[Value] = Field(min_length=1, max_length=1024)


class Uniform(_Param):
    """A float drawn evenly from ``[low, high]``."""

    type: Literal["uniform"]
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> Uniform:
        if not self.low < self.high:
            raise ValueError(f"uniform needs low < high, got low={self.low}, high={self.high}")
        return self


class LogUniform(_Param):
    """A float whose logarithm is drawn evenly: for scales such as a learning rate, where
    1e-4..1e-3 matters as much as 1e-2..1e-1."""

    type: Literal["loguniform"]
    low: float
    high: float

    @model_validator(mode="after")
    def _positive_and_ordered(self) -> LogUniform:
        if not 0 < self.low < self.high:
            raise ValueError(
                f"loguniform needs 0 < low < high, got low={self.low}, high={self.high}"
            )
        return self


class IntRange(_Param):
    """An integer among ``low, low + step, ...`` up to ``high`` (inclusive when reached)."""

    type: Literal["int"]
    low: int
    high: int
    step: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.low > self.high:
            raise ValueError(f"int needs low <= high, got low={self.low}, high={self.high}")
        return self

    def members(self) -> range:
        """Every integer the range holds, in order."""
        return range(self.low, self.high + 1, self.step)


SpaceParam = Choice | Uniform | LogUniform | IntRange
Param = Annotated[SpaceParam, Field(discriminator="type")]
"""How one hyperparameter varies, told apart by its ``type``."""


# --- the spec ---------------------------------------------------------------------------------


class Objective(Data):
    """What a trial is judged by: a metric it reports, and which way is better."""

    metric: Annotated[str, StringConstraints(min_length=1, max_length=128)] = Field(
        description="A metric the trials report (train.progress metrics, or the final ones)."
    )
    direction: Direction


class EarlyStopping(Data):
    """Median stopping (see :func:`should_stop`)."""

    rule: Literal["median"] = "median"
    warmup_steps: int = Field(
        default=0, ge=0, description="A trial is judged only from this step on."
    )
    min_trials: int = Field(
        default=3,
        ge=1,
        description="Completed trials needed before any trial is judged: a median of one or "
        "two trials would stop good trials by chance.",
    )


class SweepSpec(Data):
    """A sweep: the trials to run (a space and an algorithm), how to rank them, and how many
    run at once."""

    space: dict[ParamName, Param] = Field(
        min_length=1, description="Each hyperparameter that varies, by name."
    )
    algorithm: Algorithm = Field(
        description="grid: every combination in order; random: seeded draws; bayesian: "
        "Optuna's TPE (an optional extra), which suggests each trial from the results so far."
    )
    seed: int = Field(default=0, ge=0, description="Seeds random (and Optuna's sampler).")
    objective: Objective
    max_trials: int = Field(ge=1, le=10_000, description="A grid is cut to its first trials.")
    parallel: int = Field(default=1, ge=1, description="Trials running at once.")
    early_stopping: EarlyStopping | None = None

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        if self.parallel > self.max_trials:
            raise ValueError(
                f"parallel ({self.parallel}) cannot exceed max_trials ({self.max_trials})"
            )
        if self.algorithm == "grid":
            continuous = [
                name
                for name, param in self.space.items()
                if isinstance(param, Uniform | LogUniform)
            ]
            if continuous:
                raise ValueError(
                    f"grid needs choice or int parameters; {', '.join(continuous)} "
                    "is a continuous range: list its values as a choice, or use random"
                )
        return self


# --- trials -----------------------------------------------------------------------------------


def trials(spec: SweepSpec) -> list[dict[str, Value]]:
    """The hyperparameters of each trial, in trial order (trial ``i`` is element ``i``).

    grid: the cartesian product of the parameters in the order the space lists them, the first
    one varying slowest, cut to ``max_trials``. random: ``max_trials`` draws from
    ``random.Random(seed)``, parameter by parameter in the space's order (so the same spec gives
    the same trials anywhere); draws may repeat, as in Katib's random search. bayesian is not
    planned ahead: Optuna suggests each trial from the results so far.
    """
    if spec.algorithm == "grid":
        return list(itertools.islice(_grid(spec.space), spec.max_trials))
    if spec.algorithm == "random":
        rng = random.Random(spec.seed)  # noqa: S311 - reproducible draws, not a secret
        return [
            {name: _draw(param, rng) for name, param in spec.space.items()}
            for _ in range(spec.max_trials)
        ]
    raise ConfigError(
        "a bayesian sweep's trials are suggested by Optuna one at a time, from the results of "
        "the trials before them; they cannot be listed ahead (use grid or random for that)"
    )


def _grid(space: Mapping[str, SpaceParam]) -> Iterator[dict[str, Value]]:
    axes: list[Sequence[Value]] = []
    for name, param in space.items():
        if isinstance(param, Choice):
            axes.append(param.values)
        elif isinstance(param, IntRange):
            axes.append(param.members())
        else:  # SweepSpec refuses these; a hand-built space still gets a clear error
            raise ConfigError(f"grid cannot enumerate the continuous range {name!r}")
    names = list(space)
    for combination in itertools.product(*axes):
        yield dict(zip(names, combination, strict=True))


def _draw(param: SpaceParam, rng: random.Random) -> Value:
    if isinstance(param, Choice):
        return rng.choice(param.values)
    if isinstance(param, Uniform):
        return rng.uniform(param.low, param.high)
    if isinstance(param, LogUniform):
        drawn = math.exp(rng.uniform(math.log(param.low), math.log(param.high)))
        # exp(log(x)) can land an ulp outside the range: keep the bounds a promise.
        return min(max(drawn, float(param.low)), float(param.high))
    return param.low + param.step * rng.randrange(len(param.members()))


# --- early stopping ---------------------------------------------------------------------------


def value_at(history: History, step: int) -> float | None:
    """A trial's objective at ``step``: the value of its point with the greatest step at or
    before ``step`` (of two points at the same step, the later reported, as after a restart
    from a checkpoint), NaN points ignored; None when it reported nothing that early."""
    found: tuple[int, float] | None = None
    for point_step, value in history:
        later = found is None or point_step >= found[0]
        if point_step <= step and not math.isnan(value) and later:
            found = (point_step, value)
    return None if found is None else found[1]


def should_stop(
    history: History,
    completed: Sequence[History],
    rule: EarlyStopping,
    direction: Direction,
) -> str | None:
    """Why a running trial should stop now, or None to let it run (median stopping, as Katib
    and Vizier define it).

    Let ``(k, v)`` be the trial's latest reported point (the last of ``history``). The trial is
    stopped when all of these hold:

    - ``k >= rule.warmup_steps`` (a trial is never judged during its warm-up);
    - at least ``rule.min_trials`` completed trials have a value at step ``k``, a completed
      trial's value at ``k`` being its last reported value at or before ``k``
      (:func:`value_at`; a trial that reported nothing that early does not count);
    - ``v`` is strictly worse than the median ``m`` of those values: ``v < m`` when maximizing,
      ``v > m`` when minimizing. A value equal to the median goes on.

    A NaN ``v`` (a diverged trial) is worse than any median, once warm-up and ``min_trials``
    are met; NaN points of completed trials are ignored.
    """
    if not history:
        return None
    step, value = history[-1]
    if step < rule.warmup_steps:
        return None
    peers = [v for v in (value_at(h, step) for h in completed) if v is not None]
    if len(peers) < rule.min_trials:
        return None
    median = statistics.median(peers)
    if not (math.isnan(value) or _worse(value, median, direction)):
        return None
    return (
        f"median stopping: objective {value:.6g} at step {step} is worse than the median "
        f"{median:.6g} of {len(peers)} completed trials at that step ({direction})"
    )


def _worse(value: float, than: float, direction: Direction) -> bool:
    return value < than if direction == "maximize" else value > than


# --- the result -------------------------------------------------------------------------------


def best(results: Mapping[int, float | None], direction: Direction) -> int | None:
    """The index of the best trial by its final objective (``results``: trial index -> final
    value), ties going to the lowest index; trials without a value (None, or NaN) are left
    out. None when no trial has a value."""
    ranked = [
        (index, value)
        for index, value in sorted(results.items())
        if value is not None and not math.isnan(value)
    ]
    if not ranked:
        return None
    winner = ranked[0]
    for index, value in ranked[1:]:
        if _worse(winner[1], value, direction):
            winner = (index, value)
    return winner[0]
