"""Which ended attempt is its run's last word (``train.failed`` final): a user's cancel always
is; the monitor's cancel of a stalled attempt, like a crash, only with no restart left."""

from __future__ import annotations

import pytest

from torchrelay.services.train.domain import failure_is_final


@pytest.mark.parametrize("attempt", [0, 1, 2])
def test_a_cancel_by_a_user_ends_the_run(attempt: int) -> None:
    assert failure_is_final(attempt=attempt, max_restarts=2, cancelled=True, restart_cancel=False)


def test_the_monitors_cancel_of_a_stalled_attempt_with_restarts_left_is_not_final() -> None:
    assert not failure_is_final(attempt=0, max_restarts=2, cancelled=True, restart_cancel=True)
    assert not failure_is_final(attempt=1, max_restarts=2, cancelled=True, restart_cancel=True)


def test_the_monitors_cancel_of_the_last_attempt_is_final() -> None:
    assert failure_is_final(attempt=2, max_restarts=2, cancelled=True, restart_cancel=True)
    assert failure_is_final(attempt=0, max_restarts=0, cancelled=True, restart_cancel=True)


@pytest.mark.parametrize("restart_cancel", [False, True])
def test_a_crash_is_final_only_with_no_restart_left(restart_cancel: bool) -> None:
    # A restart cancel that raced with a crash changes nothing: the crash counts as one.
    def final(attempt: int) -> bool:
        return failure_is_final(
            attempt=attempt, max_restarts=1, cancelled=False, restart_cancel=restart_cancel
        )

    assert (final(0), final(1)) == (False, True)
