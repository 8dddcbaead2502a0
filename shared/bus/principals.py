"""Who may say what on the bus: one NATS user per principal, with subject permissions.

Pure: this module only describes. ``torchrelay up`` turns it into nats-server's
``authorization`` block (:func:`server_authorization`), the Kubernetes base carries the same
block with passwords from a Secret, and a test holds both to this description.

A fact comes only from its owner: each service may publish the event types it produces (and
dead letters), training workers only their progress and checkpoints, and an outside system (the
``publisher`` user) only requests: ``pipeline.submitted`` and ``*.requested``. ``admin`` is the
operator (the command line): replaying dead letters means publishing any subject.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torchrelay.shared.events import EVENT_TYPES, AnyEvent, catalog

SERVICE_FACTS: Mapping[str, tuple[type[AnyEvent], ...]] = {
    "ingest": (catalog.DatasetStaged, catalog.DatasetRejected, catalog.PipelineRejected),
    # The train service also runs sweeps: their trials are its runs, which a sweep's cancel
    # cancels one by one.
    "train": (
        catalog.TrainStarted,
        catalog.TrainCompleted,
        catalog.TrainFailed,
        catalog.TrainCancelRequested,
        catalog.SweepStarted,
        catalog.SweepTrialStarted,
        catalog.SweepTrialStopped,
        catalog.SweepCompleted,
    ),
    "serve": (
        catalog.ModelRolloutStarted,
        catalog.ModelDeployed,
        catalog.ModelRolloutFailed,
        catalog.ModelUndeployed,
    ),
    # The monitor drives recovery: it asks for restarts and cancels, and it ends a run that
    # stalled with no restart left (train.failed, final), since no worker will ever say so.
    # It is also the operation service: it carries out a prune and says what it removed.
    "monitor": (
        catalog.TrainRestartRequested,
        catalog.TrainCancelRequested,
        catalog.TrainFailed,
        catalog.Pruned,
    ),
}
"""The events each service publishes (besides dead letters)."""

WORKER_FACTS: tuple[type[AnyEvent], ...] = (catalog.TrainProgressed, catalog.TrainCheckpointed)
"""What a training worker (rank 0) reports."""

SERVICES = tuple(SERVICE_FACTS)
WORKER = "worker"
PUBLISHER = "publisher"
ADMIN = "admin"
USERS = (*SERVICES, WORKER, PUBLISHER, ADMIN)


def request_events() -> tuple[type[AnyEvent], ...]:
    """What anyone outside may ask for: a pipeline, or any ``*.requested`` event."""
    return tuple(
        cls
        for _, cls in sorted(EVENT_TYPES.items())
        if cls.nats_subject.endswith(".requested") or cls is catalog.PipelineSubmitted
    )


# JetStream's API, acks, KV writes and flow-control replies: what a service's bus and state
# adapters use. Destructive stream operations are denied even to services; only admin has them.
_SERVICE_API = ("$JS.API.>", "$JS.ACK.>", "$KV.>", "$JS.FC.>")
_DESTRUCTIVE_API = (
    "$JS.API.STREAM.DELETE.>",
    "$JS.API.STREAM.PURGE.>",
    "$JS.API.STREAM.MSG.DELETE.>",
    "$JS.API.STREAM.RESTORE.>",
    "$JS.API.ACCOUNT.PURGE.>",
    "$JS.API.META.>",
    "$JS.API.SERVER.>",
)


def inbox_prefix(user: str) -> str:
    """Each user's replies arrive under its own prefix, and only it may subscribe there: no
    principal can read another's replies (a KV read, a publish ack)."""
    return f"_INBOX_{user}"


@dataclass(frozen=True)
class Permissions:
    publish_allow: tuple[str, ...]
    subscribe_allow: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()

    def to_config(self) -> dict[str, Any]:
        publish: dict[str, Any] = {"allow": list(self.publish_allow)}
        if self.publish_deny:
            publish["deny"] = list(self.publish_deny)
        return {"publish": publish, "subscribe": {"allow": list(self.subscribe_allow)}}


def _subjects(events: Iterable[type[AnyEvent]]) -> tuple[str, ...]:
    return tuple(sorted({cls.nats_subject for cls in events}))


def permissions(user: str, *, stream: str = "TORCHRELAY") -> Permissions | None:
    """The subject permissions of ``user``; None for admin (everything)."""
    inbox = f"{inbox_prefix(user)}.>"
    if user in SERVICE_FACTS:
        return Permissions(
            publish_allow=(*_subjects([*SERVICE_FACTS[user], catalog.DeadLettered]), *_SERVICE_API),
            publish_deny=_DESTRUCTIVE_API,
            subscribe_allow=(inbox,),
        )
    if user == WORKER:
        return Permissions(publish_allow=_subjects(WORKER_FACTS), subscribe_allow=(inbox,))
    if user == PUBLISHER:
        # Read facts live (core subscriptions) or by stream sequence; never consume a
        # service's durable consumer, never write state.
        return Permissions(
            publish_allow=(
                *_subjects(request_events()),
                "$JS.API.INFO",
                f"$JS.API.STREAM.INFO.{stream}",
                f"$JS.API.STREAM.MSG.GET.{stream}",
            ),
            # _INBOX.>: an outside client's default reply prefix (for its publish acks); no
            # torchrelay principal uses it, so nothing of theirs can be read there.
            subscribe_allow=(inbox, "_INBOX.>", "torchrelay.>"),
        )
    if user == ADMIN:
        return None
    raise ValueError(f"unknown NATS user {user!r}; known: {', '.join(USERS)}")


def server_authorization(
    passwords: Mapping[str, str], *, stream: str = "TORCHRELAY"
) -> dict[str, Any]:
    """nats-server's ``authorization`` block for these users (password per user name)."""
    users = []
    for user in USERS:
        entry: dict[str, Any] = {"user": user, "password": passwords[user]}
        allowed = permissions(user, stream=stream)
        if allowed is not None:
            entry["permissions"] = allowed.to_config()
        users.append(entry)
    return {"users": users}


def password_variable(user: str) -> str:
    """The environment variable nats-server reads ``user``'s password from (Kubernetes)."""
    return f"TORCHRELAY_NATS_PASSWORD_{user.upper()}"


def secret_name(user: str) -> str:
    """The Kubernetes Secret (key ``password``) holding ``user``'s password."""
    return f"torchrelay-nats-{user}"


def authorization_config(*, stream: str = "TORCHRELAY") -> str:
    """nats-server configuration text with the ``authorization`` block, each password a
    reference to :func:`password_variable` (nats-server resolves an unquoted ``$NAME`` from its
    environment): the Kubernetes base ships this with passwords from Secrets."""
    block = server_authorization(
        {user: f"${password_variable(user)}" for user in USERS}, stream=stream
    )
    text = (
        "# Generated by `torchrelay schema nats-auth` from torchrelay.shared.bus.principals;\n"
        "# a test keeps k8s/base/nats/auth.conf equal to it. Passwords come from Secrets.\n"
        "authorization: " + json.dumps(block, indent=2)
    )
    return re.sub(r'"\$(TORCHRELAY_NATS_PASSWORD_[A-Z]+)"', r"$\1", text) + "\n"
