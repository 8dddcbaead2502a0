"""JSON Schema per event type and an AsyncAPI 3 document, generated from the event models.

Pure: returns dicts. ``torchrelay schema export DIR`` writes them for external publishers.
"""

from __future__ import annotations

from typing import Any

from torchrelay import __version__
from torchrelay.shared.events.envelope import EVENT_TYPES, AnyEvent

SCHEMA_ID_BASE = "https://torchrelay.io/schemas/events/"


def schema_file_name(event_type: str) -> str:
    return f"{event_type}.schema.json"


def event_json_schema(cls: type[AnyEvent]) -> dict[str, Any]:
    """JSON Schema (2020-12) of one event type in structured CloudEvents JSON."""
    schema = cls.model_json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID_BASE + schema_file_name(cls.event_type),
        **schema,
    }


def all_json_schemas() -> dict[str, dict[str, Any]]:
    return {event_type: event_json_schema(cls) for event_type, cls in sorted(EVENT_TYPES.items())}


def _message_name(cls: type[AnyEvent]) -> str:
    return cls.__name__


def asyncapi_document() -> dict[str, Any]:
    """An AsyncAPI 3.0 document: one channel per NATS subject, one message per event type."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for event_type, cls in sorted(EVENT_TYPES.items()):
        name = _message_name(cls)
        channel_id = cls.nats_subject.replace(".", "_")
        schema = cls.model_json_schema(ref_template="#/components/schemas/{model}")
        for def_name, definition in schema.pop("$defs", {}).items():
            schemas.setdefault(def_name, definition)
        schemas[name] = schema
        messages[name] = {
            "name": event_type,
            "title": name,
            "summary": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else event_type,
            "contentType": "application/cloudevents+json",
            "headers": {
                "type": "object",
                "properties": {
                    "Nats-Msg-Id": {
                        "type": "string",
                        "description": "Must equal the event id: the stream stores an id once.",
                    }
                },
                "required": ["Nats-Msg-Id"],
            },
            "payload": {"$ref": f"#/components/schemas/{name}"},
        }
        channel = channels.setdefault(
            channel_id,
            {
                "address": cls.nats_subject,
                "messages": {},
                "description": f"Subject {cls.nats_subject}.",
            },
        )
        channel["messages"][name] = {"$ref": f"#/components/messages/{name}"}
        operations[f"publish{name}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "messages": [{"$ref": f"#/channels/{channel_id}/messages/{name}"}],
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "torchrelay events",
            "version": __version__,
            "description": (
                "Every event torchrelay services publish or react to. Events are CloudEvents 1.0 "
                "in structured JSON mode on NATS JetStream; publish with the header "
                "Nats-Msg-Id equal to the event id."
            ),
        },
        "defaultContentType": "application/cloudevents+json",
        "servers": {
            "local": {
                "host": "127.0.0.1:4222",
                "protocol": "nats",
                "description": (
                    "The embedded default started by `torchrelay up`: port 4222 when it is "
                    "free, else a free port that `up` prints. `torchrelay env` prints the URL "
                    "with credentials (TORCHRELAY_PUBLISHER_URL for other systems)."
                ),
                "security": [{"$ref": "#/components/securitySchemes/userPassword"}],
            },
            "kubernetes": {
                "host": "nats.torchrelay.svc:4222",
                "protocol": "nats",
                "description": (
                    "The NATS Service of the Kubernetes base (k8s/base), in namespace "
                    "torchrelay; passwords in the torchrelay-nats-<user> Secrets."
                ),
                "security": [{"$ref": "#/components/securitySchemes/userPassword"}],
            },
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages,
            "schemas": schemas,
            "securitySchemes": {
                "userPassword": {
                    "type": "userPassword",
                    "description": (
                        "One NATS user per principal. Other systems connect as `publisher`: "
                        "it may publish pipeline.submitted and *.requested events and "
                        "subscribe to torchrelay.>; facts come only from the services."
                    ),
                }
            },
        },
    }


def catalogue_markdown() -> str:
    """The event catalogue as a Markdown table (the README embeds it; a test keeps it fresh)."""
    rows = ["| subject | type | data fields (* required) | meaning |", "|---|---|---|---|"]
    for event_type, cls in sorted(EVENT_TYPES.items(), key=lambda item: item[1].nats_subject):
        data_model = cls.model_fields["data"].annotation
        fields = getattr(data_model, "model_fields", {})
        names = ", ".join(
            f"`{name}`{'*' if field.is_required() else ''}" for name, field in fields.items()
        )
        meaning = (cls.__doc__ or "").strip().splitlines()[0]
        rows.append(f"| `{cls.nats_subject}` | `{event_type}` | {names} | {meaning} |")
    return "\n".join(rows) + "\n"
