"""A sweep's spec, the ``sweep:`` block of a pipeline spec: the search space, the algorithm, the
objective, how many trials run at once, and the early-stopping rule. Part of the event contract
(``pipeline.submitted`` carries it), so a bad space is refused when the event is decoded, with the
reason; the logic that plans trials and stops them is in :mod:`torchrelay.shared.sweeps`.
"""

from __future__ import annotations

import math
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
)

from torchrelay.shared.events.envelope import Data

Value = StrictBool | StrictInt | StrictFloat | Annotated[str, StringConstraints(max_length=256)]
"""One hyperparameter's value in a trial. Strict: ``"0.1"`` stays a string, ``True`` a bool."""


ParamName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=64)]
"""A hyperparameter's name: a Python identifier, as the training function reads it."""

Algorithm = Literal["grid", "random", "bayesian"]
Direction = Literal["maximize", "minimize"]


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


class LogUniform(_Param):
    """A float whose logarithm is drawn evenly: for scales such as a learning rate, where
    1e-4..1e-3 matters as much as 1e-2..1e-1."""

    type: Literal["loguniform"]
    low: float = Field(gt=0)
    high: float = Field(gt=0)


class IntRange(_Param):
    """An integer among ``low, low + step, ...`` up to ``high`` (inclusive when reached)."""

    type: Literal["int"]
    low: int
    high: int
    step: int = Field(default=1, ge=1)

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
    run at once.

    Decoding checks each field on its own, as the exported JSON Schema does; what relates
    fields (low below high, a grid of enumerable parameters, no more parallel trials than
    trials) is :func:`torchrelay.shared.sweeps.sweep_refusal`'s, which refuses a submission
    with its reason (``torchrelay submit`` before it publishes, ingest with a
    ``pipeline.rejected``)."""

    space: dict[ParamName, Param] = Field(
        min_length=1,
        description="Each hyperparameter that varies, by name.",
        json_schema_extra={"additionalProperties": False},  # a name off the pattern is refused
    )
    algorithm: Algorithm = Field(
        description="grid: every combination in order; random: seeded draws; bayesian: "
        "Optuna's TPE (an optional extra), which suggests each trial from the results so far."
    )
    seed: int = Field(default=0, ge=0, description="Seeds random (and Optuna's sampler).")
    objective: Objective
    max_trials: int = Field(
        ge=1,
        le=1000,
        description="A grid is cut to its first trials. At most 1,000: a sweep's record, "
        "every trial in it, stays one KV value well under NATS's 1 MiB message limit.",
    )
    parallel: int = Field(default=1, ge=1, description="Trials running at once.")
    early_stopping: EarlyStopping | None = None
