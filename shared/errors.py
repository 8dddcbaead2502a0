"""One error hierarchy for torchrelay. Retryability lives in the type.

The bus maps these onto JetStream actions in one place (see ``torchrelay.shared.bus.outcome``):
``PermanentError`` terminates the event and dead-letters it, ``TransientError`` redelivers it
after its delay, anything else is retried with backoff up to the consumer's max deliveries.
"""

from __future__ import annotations


class TorchrelayError(Exception):
    """Base of every error torchrelay raises on purpose."""


class PermanentError(TorchrelayError):
    """Retrying cannot help: the input is wrong. The event is terminated and dead-lettered."""


class TransientError(TorchrelayError):
    """Retrying later may help (a dependency is down, a lease is held elsewhere)."""

    def __init__(self, message: str, *, delay_s: float = 1.0) -> None:
        super().__init__(message)
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        self.delay_s = delay_s


class ConfigError(TorchrelayError, ValueError):
    """Settings or a spec are invalid; the message lists what to fix."""


class Refused(TorchrelayError):
    """A request a client does not send, because it cannot do anything (a cancel of a run that
    ended, a rollback of a model that is not deployed): the message says why, in one line."""


class JobNotFound(TorchrelayError, LookupError):
    """A backend was asked about a job it does not know."""


class NotOwned(JobNotFound):
    """A backend was asked to act on a job that another replica started and only that one
    can reach (a local worker is a child of its replica's process): leave the request to the
    owner, e.g. redeliver the event until the owner picks it up."""


class StaleRevision(TorchrelayError):
    """A compare-and-set write lost: the stored revision moved since it was read."""

    def __init__(self, bucket: str, key: str, expected: int | None) -> None:
        super().__init__(
            f"{bucket}/{key}: expected revision {expected}, but it changed; "
            "read it again and retry the update"
        )
        self.bucket = bucket
        self.key = key
        self.expected = expected


class AlreadyExists(TorchrelayError):
    """A create found the key already present."""

    def __init__(self, bucket: str, key: str) -> None:
        super().__init__(f"{bucket}/{key} already exists")
        self.bucket = bucket
        self.key = key


class LeaseLost(TorchrelayError):
    """A lease expired or was taken by another holder before it was renewed or released."""


class UnsafePath(PermanentError):
    """A path resolves outside the root it must stay in."""
