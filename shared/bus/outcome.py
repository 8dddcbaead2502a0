"""The bus's one outcome table: how a handler's result becomes a JetStream action.

| handler result                              | action                                         |
|---------------------------------------------|------------------------------------------------|
| returns                                     | ack                                            |
| raises TransientError(delay_s)              | nak(delay_s); dead-letter on the last delivery |
| raises PermanentError (decode errors too)   | term + dead-letter with the reason             |
| any other exception                         | nak(backoff[n]); dead-letter on the last one   |
| cancelled                                   | no ack (redelivered after ack_wait), re-raise  |

Cancellation never reaches :func:`decide`: the adapter re-raises it.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from torchrelay.shared.errors import PermanentError, TransientError


class Action(enum.Enum):
    ACK = "ack"
    NAK = "nak"
    TERM = "term"


@dataclass(frozen=True, slots=True)
class Outcome:
    action: Action
    delay_s: float = 0.0
    dead_letter_reason: str | None = None

    @property
    def label(self) -> str:
        """Bounded label for metrics: ack, retry, deadletter."""
        if self.dead_letter_reason is not None:
            return "deadletter"
        return "ack" if self.action is Action.ACK else "retry"


ACKED = Outcome(Action.ACK)


def backoff_delay(backoff_s: Sequence[float], delivered: int) -> float:
    """Delay before delivery ``delivered + 1``: the n-th entry, then the last one forever."""
    if not backoff_s:
        return 0.0
    return backoff_s[min(max(delivered, 1), len(backoff_s)) - 1]


def decide(
    error: Exception | None,
    *,
    delivered: int,
    max_deliver: int,
    backoff_s: Sequence[float],
) -> Outcome:
    """Map a handler's result on delivery number ``delivered`` (1-based) to an action."""
    if error is None:
        return ACKED
    described = f"{type(error).__name__}: {error}"
    if isinstance(error, PermanentError):
        return Outcome(Action.TERM, dead_letter_reason=described)
    if delivered >= max_deliver:
        return Outcome(
            Action.TERM,
            dead_letter_reason=f"gave up after {delivered} deliveries; last error {described}",
        )
    if isinstance(error, TransientError):
        return Outcome(Action.NAK, delay_s=error.delay_s)
    return Outcome(Action.NAK, delay_s=backoff_delay(backoff_s, delivered))
