"""The bus's one outcome table."""

from __future__ import annotations

from torchrelay.shared.bus.outcome import Action, backoff_delay, decide
from torchrelay.shared.errors import PermanentError, TransientError

BACKOFF = (1.0, 5.0, 30.0)


def test_success_acks() -> None:
    outcome = decide(None, delivered=1, max_deliver=3, backoff_s=BACKOFF)
    assert outcome.action is Action.ACK
    assert outcome.dead_letter_reason is None


def test_transient_error_naks_with_its_own_delay() -> None:
    outcome = decide(
        TransientError("db down", delay_s=7), delivered=1, max_deliver=3, backoff_s=BACKOFF
    )
    assert (outcome.action, outcome.delay_s) == (Action.NAK, 7)


def test_permanent_error_terminates_and_dead_letters_at_once() -> None:
    outcome = decide(PermanentError("bad path"), delivered=1, max_deliver=5, backoff_s=BACKOFF)
    assert outcome.action is Action.TERM
    assert outcome.dead_letter_reason == "PermanentError: bad path"


def test_other_errors_back_off_then_dead_letter_on_the_last_delivery() -> None:
    delays = [
        decide(RuntimeError("boom"), delivered=n, max_deliver=4, backoff_s=BACKOFF).delay_s
        for n in (1, 2, 3)
    ]
    assert delays == [1.0, 5.0, 30.0]
    last = decide(RuntimeError("boom"), delivered=4, max_deliver=4, backoff_s=BACKOFF)
    assert last.action is Action.TERM
    assert last.dead_letter_reason is not None
    assert "4 deliveries" in last.dead_letter_reason
    assert "RuntimeError: boom" in last.dead_letter_reason


def test_transient_errors_also_stop_at_max_deliveries() -> None:
    outcome = decide(TransientError("still down"), delivered=3, max_deliver=3, backoff_s=BACKOFF)
    assert outcome.action is Action.TERM


def test_backoff_repeats_its_last_step() -> None:
    assert backoff_delay(BACKOFF, 10) == 30.0
    assert backoff_delay((), 2) == 0.0
