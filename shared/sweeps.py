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

from torchrelay.shared.errors import ConfigError
from torchrelay.shared.events.sweep import (
    Choice,
    Direction,
    EarlyStopping,
    IntRange,
    LogUniform,
    Objective,
    SpaceParam,
    SweepSpec,
    Uniform,
    Value,
)

__all__ = [
    "Choice",
    "EarlyStopping",
    "History",
    "IntRange",
    "LogUniform",
    "Objective",
    "SweepSpec",
    "Uniform",
    "best",
    "objective_value",
    "should_stop",
    "sweep_refusal",
    "trials",
    "value_at",
]

History = Sequence[tuple[int, float]]
"""A trial's objective as it reported it: ``(step, value)`` points in the order they came."""


# --- refusals ---------------------------------------------------------------------------------


def sweep_refusal(spec: SweepSpec) -> str | None:
    """Why a decoded sweep cannot run, or None: the rules that relate fields, which a JSON
    Schema cannot state (each field alone is checked when the spec is decoded). Every problem
    is named, in the space's order."""
    problems = [
        f"{name}: {problem}"
        for name, param in spec.space.items()
        if (problem := _range_problem(param)) is not None
    ]
    if spec.algorithm == "grid":
        continuous = [n for n, p in spec.space.items() if isinstance(p, Uniform | LogUniform)]
        if continuous:
            problems.append(
                f"grid needs choice or int parameters; {', '.join(continuous)} is a continuous "
                "range: list its values as a choice, or use random"
            )
    if spec.parallel > spec.max_trials:
        problems.append(f"parallel ({spec.parallel}) cannot exceed max_trials ({spec.max_trials})")
    return "; ".join(problems) or None


def _range_problem(param: SpaceParam) -> str | None:
    if isinstance(param, Uniform | LogUniform) and not param.low < param.high:
        return f"{param.type} needs low < high, got low={param.low}, high={param.high}"
    if isinstance(param, IntRange) and param.low > param.high:
        return f"int needs low <= high, got low={param.low}, high={param.high}"
    return None


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


def objective_value(
    metric: str, *, loss: float | None, metrics: Mapping[str, float | None]
) -> float | None:
    """The objective in one progress report: the named metric, or the loss when the metric is
    named ``loss`` and the report has no metric of that name; None when the report lacks it.
    A value reported as null (it was NaN or infinite: the trial diverged) is NaN, which
    median stopping counts as worse than any median."""
    if metric in metrics:
        value = metrics[metric]
    elif metric == "loss":
        value = loss
    else:
        return None
    return math.nan if value is None else float(value)
