"""Why a training rank's code failed: ``runs/<id>/logs/attempt-<a>/rank-<r>.error.json``.

The rank that catches the exception writes :class:`RankFailure` before it exits; the train
service reads every rank's file of the attempt (the storage is shared, so for any backend) and
decides whether restarting could help. A rank killed by a signal writes nothing.

Whether a failure would repeat is decided where the exception is, in the rank, by
:func:`repeatable`: code that cannot be imported or called, or that raised before the attempt's
first step, fails the same way again, unless the exception is a collective's (a peer rank died,
the rendezvous or the network failed), which says nothing about this rank's code.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, ClassVar, Literal

from pydantic import AwareDatetime, Field, StringConstraints

from torchrelay.shared.storage.files import NonEmpty, StoredFile

FailurePhase = Literal["import", "before_first_step", "after_progress"]
"""Where the code failed: importing or finding the entrypoint; in the training function before
this attempt's first step; after at least one step of this attempt."""

MESSAGE_CHARS = 2000
TRACEBACK_LINES = 20
LINE_CHARS = 500
_EXCEPTION_LINES = 5

Message = Annotated[str, StringConstraints(max_length=MESSAGE_CHARS)]
Line = Annotated[str, StringConstraints(max_length=LINE_CHARS)]

# What torch.distributed raises on a rank whose peer died (torch 2.13, gloo): a plain
# RuntimeError from gloo's transport ("Connection closed by peer", "Connection reset by peer")
# during DDP's construction, a barrier or the all-reduce of a backward pass, whose frames show
# no torch.distributed code at all in the last case; a RuntimeError "Wait timeout" from the
# rendezvous store in init_process_group. Newer errors are DistError and its subclasses.
_COLLECTIVE_TYPES = frozenset(
    {"DistError", "DistBackendError", "DistNetworkError", "DistStoreError"}
)
_COLLECTIVE_FRAMES = ("torch/distributed/", "torch/nn/parallel/distributed.py")
_COLLECTIVE_WORDS = ("gloo", "nccl", "closed by peer", "reset by peer")


class SameEveryTime(Exception):
    """Mixed into the training SDK's errors that the same code and data raise on every attempt
    (labels that do not name the model's outputs at export): such a failure ends the run at
    once, even after progress, where a restart would only train again to fail again."""


class RankFailure(StoredFile):
    """``rank-<r>.error.json``: the exception that ended a rank's training code."""

    describes: ClassVar[str] = "rank failure (rank-<r>.error.json)"

    rank: int = Field(ge=0)
    attempt: int = Field(ge=0)
    entrypoint: NonEmpty
    phase: FailurePhase
    error_type: NonEmpty = Field(description="The exception's qualified class name.")
    message: Message = Field(description=f"Its message, at most {MESSAGE_CHARS} characters.")
    traceback: tuple[Line, ...] = Field(
        max_length=TRACEBACK_LINES,
        description=f"The formatted traceback's last {TRACEBACK_LINES} lines.",
    )
    step: int = Field(ge=0, description="The run's step when it failed.")
    repeatable: bool = Field(
        description="Whether another attempt would fail the same way (see repeatable())."
    )
    collective: bool = Field(
        default=False, description="Whether it is a collective's failure (a peer, the network)."
    )
    written: AwareDatetime = Field(
        description="When the rank wrote it: a file older than its attempt is another run's."
    )

    @classmethod
    def of(
        cls,
        exc: BaseException,
        *,
        rank: int,
        attempt: int,
        entrypoint: str,
        phase: FailurePhase,
        step: int,
    ) -> RankFailure:
        """The failure record of ``exc``, caught in ``phase`` at ``step``."""
        collective = collective_failure(exc)
        same = any(isinstance(link, SameEveryTime) for link in _chain(exc))
        return cls(
            rank=rank,
            attempt=attempt,
            entrypoint=entrypoint,
            phase=phase,
            error_type=qualified_name(type(exc)),
            message=str(exc)[:MESSAGE_CHARS],
            traceback=traceback_tail(exc),
            step=step,
            repeatable=repeatable(phase, collective=collective, same_every_time=same),
            collective=collective,
            written=datetime.now(UTC),
        )

    @property
    def summary(self) -> str:
        """``Type: message`` on one line, the message shortened."""
        first = self.message.strip().splitlines()[0] if self.message.strip() else ""
        first = first if len(first) <= 200 else f"{first[:197]}..."
        return f"{self.error_type}: {first}" if first else self.error_type


def repeatable(phase: FailurePhase, *, collective: bool, same_every_time: bool = False) -> bool:
    """Whether a failure in ``phase`` would happen again in a fresh attempt: one in importing
    or calling the entrypoint always does, and so does an SDK error marked
    :class:`SameEveryTime`; one before the attempt's first step does unless it is a
    collective's (a peer rank died, the rendezvous failed); one after progress may be
    transient (the attempt got somewhere), so it is restarted from the checkpoint."""
    if phase == "import" or same_every_time:
        return True
    return phase == "before_first_step" and not collective


def collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it chains) is a torch.distributed failure: a
    ``DistError``, raised from torch.distributed or DDP code, or gloo's or NCCL's transport
    error. Such a failure on one rank is usually another rank's death."""
    for link in _chain(exc):
        names = {kind.__name__ for kind in type(link).__mro__}
        if names & _COLLECTIVE_TYPES and type(link).__module__.startswith("torch"):
            return True
        text = str(link).lower()
        if any(word in text for word in _COLLECTIVE_WORDS):
            return True
        frames = traceback.extract_tb(link.__traceback__)
        if any(marker in frame.filename for frame in frames for marker in _COLLECTIVE_FRAMES):
            return True
    return False


def qualified_name(kind: type[BaseException]) -> str:
    """``module.Qualname``, or only the name for a builtin (``ValueError``)."""
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def traceback_tail(exc: BaseException, lines: int = TRACEBACK_LINES) -> tuple[str, ...]:
    """The formatted traceback's last ``lines`` lines (its end says where and what), the
    exception's own text cut to its first lines so that a long message leaves the frames in
    view (the message is kept whole elsewhere)."""
    full = "".join(traceback.format_exception(exc)).splitlines()
    only = "".join(traceback.format_exception_only(exc)).splitlines()
    frames = full[: len(full) - len(only)]
    if len(only) > _EXCEPTION_LINES:
        only = [*only[:_EXCEPTION_LINES], "..."]
    kept = [line[:LINE_CHARS] for line in (*frames, *only) if line.strip()]
    return tuple(kept[-lines:])


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


__all__ = [
    "FailurePhase",
    "RankFailure",
    "SameEveryTime",
    "collective_failure",
    "qualified_name",
    "repeatable",
    "traceback_tail",
]
