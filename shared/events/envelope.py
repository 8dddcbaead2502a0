"""The CloudEvents 1.0 envelope every torchrelay event travels in (structured JSON mode).

One subclass per event type pins ``type`` to a literal and ``data`` to a typed model. Subclasses
register themselves in :data:`EVENT_TYPES`, which is how :func:`decode` finds the class of an
incoming payload; the NATS subject of a type derives from its name in one function,
:func:`subject_for_type`, so services never spell a subject.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar, Union

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)

from torchrelay.shared.errors import PermanentError

TYPE_PREFIX = "io.torchrelay."
SUBJECT_PREFIX = "torchrelay"
_TYPE_RE = re.compile(r"^io\.torchrelay\.(?P<name>[a-z]+(?:\.[a-z]+)*)\.v(?P<version>[1-9][0-9]*)$")


def subject_for_type(event_type: str) -> str:
    """The NATS subject of an event type: ``io.torchrelay.a.b.v1`` -> ``torchrelay.a.b``."""
    match = _TYPE_RE.match(event_type)
    if match is None:
        raise ValueError(
            f"event type {event_type!r} does not follow io.torchrelay.<domain>.<event>.v<N>"
        )
    return f"{SUBJECT_PREFIX}.{match['name']}"


def new_event_id() -> str:
    return str(uuid.uuid4())


def utc_now() -> datetime:
    return datetime.now(UTC)


class Data(BaseModel):
    """Base of every event's ``data``: frozen, unknown fields refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


NonEmpty = Annotated[str, StringConstraints(min_length=1, max_length=512)]
# CloudEvents extension attribute values are short strings; ids are bounded so a hostile
# publisher cannot blow up KV keys or log lines.
Identifier = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
]

DataT = TypeVar("DataT", bound=Data)


class CloudEvent(BaseModel, Generic[DataT]):
    """A CloudEvents 1.0 event in structured JSON mode, with torchrelay's extensions.

    Extension attributes: ``pipelineid`` (the pipeline this event belongs to, the correlation
    id) and ``causationid`` (the id of the event that caused this one). ``traceparent`` and
    ``tracestate`` from the CloudEvents distributed-tracing extension are accepted and kept.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_type: ClassVar[str]
    nats_subject: ClassVar[str]

    specversion: Literal["1.0"] = "1.0"
    id: NonEmpty = Field(
        default_factory=new_event_id, description="Unique per event; the Nats-Msg-Id."
    )
    source: NonEmpty = Field(description="URI-reference of the producer, e.g. /torchrelay/ingest.")
    type: str
    time: AwareDatetime = Field(default_factory=utc_now)
    subject: NonEmpty | None = Field(
        default=None, description="What the event is about within the source (a run id, a dataset)."
    )
    datacontenttype: Literal["application/json", "application/json; charset=utf-8"] = (
        "application/json"
    )
    dataschema: NonEmpty | None = None
    pipelineid: Identifier | None = Field(
        default=None, description="Correlation id: the pipeline this event belongs to."
    )
    causationid: NonEmpty | None = Field(
        default=None, description="Id of the event that caused this one."
    )
    traceparent: NonEmpty | None = None
    tracestate: NonEmpty | None = None
    data: DataT

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        field = cls.model_fields.get("type")
        default = None if field is None else field.default
        if not isinstance(default, str) or not default.startswith(TYPE_PREFIX):
            # Generic parametrisations (CloudEvent[SomeData]) pass through here too.
            return
        if default in EVENT_TYPES and EVENT_TYPES[default] is not cls:
            raise TypeError(f"event type {default} is defined twice")
        cls.event_type = default
        cls.nats_subject = subject_for_type(default)
        EVENT_TYPES[default] = cls

    def caused(self) -> dict[str, str | None]:
        """Envelope fields for an event this one causes: same pipeline, causation = this id."""
        return {"pipelineid": self.pipelineid, "causationid": self.id}

    def to_json(self) -> bytes:
        """Structured-mode JSON; absent optional attributes are omitted, not null."""
        return self.model_dump_json(exclude_none=True).encode()


AnyEvent = CloudEvent[Any]
EVENT_TYPES: dict[str, type[AnyEvent]] = {}


class InvalidEvent(PermanentError):
    """A payload that is not a valid torchrelay event. Never retried."""


_ADAPTER: TypeAdapter[Any] | None = None
_ADAPTER_SIZE = 0


def _adapter() -> TypeAdapter[Any]:
    """One discriminated union over every registered type: JSON is parsed and validated in a
    single pass in pydantic-core (rebuilt if a type registers later)."""
    global _ADAPTER, _ADAPTER_SIZE  # noqa: PLW0603 - a cache of the registry
    if _ADAPTER is None or len(EVENT_TYPES) != _ADAPTER_SIZE:
        members = tuple(EVENT_TYPES.values())
        union = members[0] if len(members) == 1 else Union[members]  # noqa: UP007
        _ADAPTER = TypeAdapter(Annotated[union, Field(discriminator="type")])  # type: ignore[arg-type]
        _ADAPTER_SIZE = len(EVENT_TYPES)
    return _ADAPTER


def decode(payload: bytes, *, subject: str | None = None) -> AnyEvent:
    """Parse a structured-mode CloudEvent into its registered class.

    Raises :class:`InvalidEvent` with a reason a human can act on: not JSON, not an object,
    an unknown type, a type that does not belong on ``subject``, or the fields that failed.
    """
    try:
        event: AnyEvent = _adapter().validate_json(payload)
    except ValidationError as exc:
        raise InvalidEvent(_describe(exc)) from exc
    if subject is not None and subject != event.nats_subject:
        raise InvalidEvent(
            f"event type {event.type} belongs on {event.nats_subject}, not on {subject}"
        )
    return event


def _describe(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    first = errors[0]
    kind = first["type"]
    if kind == "json_invalid":
        return f"payload is not JSON: {first['msg']}"
    if not first["loc"] and kind in {"dict_type", "model_type", "model_attributes_type"}:
        return "payload must be a JSON object"
    if kind == "union_tag_not_found":
        return "payload has no string 'type' attribute"
    if kind == "union_tag_invalid":
        given = first.get("ctx", {}).get("tag")
        return f"unknown event type {given!r}"
    event_type = str(first["loc"][0]) if first["loc"] else "event"
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc'][1:]) or '<root>'}: {err['msg']}" for err in errors
    )
    return f"{event_type} failed validation: {problems}"
