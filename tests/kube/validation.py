"""The API server's object name and label rules (k8s.io/apimachinery validation), pure: each
function returns the field errors of one object, as the API server words them; none is valid.

Names: DNS-1123 subdomains for most kinds, DNS-1035 labels for Services (their name is a DNS
label in cluster DNS and must not start with a digit), and a Job's name is also a label value
(the controller labels its pods with it). A pod's ``hostname`` and ``subdomain`` are DNS-1123
labels. Label keys are an optional DNS-1123 subdomain prefix and a name of at most 63
characters; label values are empty or at most 63 characters of the same alphabet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

Object = dict[str, Any]

DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS1123_SUBDOMAIN = re.compile(rf"{DNS1123_LABEL.pattern}(\.{DNS1123_LABEL.pattern})*")
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
LABEL_MAX = 63
SUBDOMAIN_MAX = 253

DNS1123_LABEL_TEXT = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
    "and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', "
    "regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
DNS1123_SUBDOMAIN_TEXT = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' "
    "or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
DNS1035_LABEL_TEXT = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
    "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or "
    "'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"
)
QUALIFIED_TEXT = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and "
    "end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex "
    "used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
)
LABEL_VALUE_TEXT = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or "
    "'my_value',  or '12345', regex used for validation is "
    "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)


@dataclass(frozen=True)
class FieldError:
    field: str
    value: str
    detail: str

    def __str__(self) -> str:
        return f'{self.field}: Invalid value: "{self.value}": {self.detail}'


def _too_long(limit: int) -> str:
    return f"must be no more than {limit} characters"


def dns1123_label(value: str) -> list[str]:
    problems = [] if len(value) <= LABEL_MAX else [_too_long(LABEL_MAX)]
    return problems + ([] if DNS1123_LABEL.fullmatch(value) else [DNS1123_LABEL_TEXT])


def dns1123_subdomain(value: str) -> list[str]:
    problems = [] if len(value) <= SUBDOMAIN_MAX else [_too_long(SUBDOMAIN_MAX)]
    return problems + ([] if DNS1123_SUBDOMAIN.fullmatch(value) else [DNS1123_SUBDOMAIN_TEXT])


def dns1035_label(value: str) -> list[str]:
    problems = [] if len(value) <= LABEL_MAX else [_too_long(LABEL_MAX)]
    return problems + ([] if DNS1035_LABEL.fullmatch(value) else [DNS1035_LABEL_TEXT])


def label_key(key: str) -> list[str]:
    prefix, slash, name = key.rpartition("/")
    problems = []
    if slash and not prefix:
        problems.append("prefix part must be non-empty")
    elif slash:
        problems += [f"prefix part {p}" for p in dns1123_subdomain(prefix)]
    if not name:
        problems.append("name part must be non-empty")
    else:
        if len(name) > LABEL_MAX:
            problems.append(f"name part {_too_long(LABEL_MAX)}")
        if not QUALIFIED_NAME.fullmatch(name):
            problems.append(QUALIFIED_TEXT)
    return problems


def label_value(value: str) -> list[str]:
    problems = [] if len(value) <= LABEL_MAX else [_too_long(LABEL_MAX)]
    if value and not QUALIFIED_NAME.fullmatch(value):
        problems.append(LABEL_VALUE_TEXT)
    return problems


def labels(where: str, given: object) -> list[FieldError]:
    if not isinstance(given, dict):
        return []
    errors = []
    for key, value in given.items():
        errors += [FieldError(where, key, p) for p in label_key(str(key))]
        if not isinstance(value, str):
            errors.append(FieldError(f"{where}[{key}]", repr(value), "must be a string"))
            continue
        errors += [FieldError(f"{where}[{key}]", value, p) for p in label_value(value)]
    return errors


NAME_RULES = {
    "services": dns1035_label,
    "pods": dns1123_subdomain,
    "jobs": dns1123_subdomain,
    "deployments": dns1123_subdomain,
    "replicasets": dns1123_subdomain,
}


def _pod_spec(where: str, spec: object) -> list[FieldError]:
    if not isinstance(spec, dict):
        return []
    errors = []
    for field in ("hostname", "subdomain"):
        if field in spec:
            value = str(spec[field])
            errors += [FieldError(f"{where}.{field}", value, p) for p in dns1123_label(value)]
    return errors


def validate(plural: str, obj: Object) -> list[FieldError]:
    """Every field error of ``obj`` (of resource ``plural``) that the API server would name."""
    metadata = obj.get("metadata") or {}
    name = str(metadata.get("name", ""))
    errors: list[FieldError] = []
    if not name:
        errors.append(FieldError("metadata.name", name, "name or generateName is required"))
    else:
        errors += [FieldError("metadata.name", name, p) for p in NAME_RULES[plural](name)]
        if plural == "jobs" and len(name) > LABEL_MAX:  # it becomes the pods' job-name label
            errors.append(FieldError("metadata.name", name, _too_long(LABEL_MAX)))
    errors += labels("metadata.labels", metadata.get("labels"))
    spec = obj.get("spec") or {}
    if plural == "pods":
        errors += _pod_spec("spec", spec)
    template = spec.get("template") if isinstance(spec, dict) else None
    if isinstance(template, dict):
        errors += labels(
            "spec.template.metadata.labels", (template.get("metadata") or {}).get("labels")
        )
        errors += _pod_spec("spec.template.spec", template.get("spec"))
    selector = spec.get("selector") if isinstance(spec, dict) else None
    if isinstance(selector, dict):
        matched = selector.get("matchLabels") if plural != "services" else selector
        errors += labels(
            "spec.selector" + (".matchLabels" if plural != "services" else ""), matched
        )
    return errors


def invalid_status(kind: str, name: str, errors: list[FieldError]) -> Object:
    """The 422 body of a real API server for ``errors``."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f'{kind} "{name}" is invalid: ' + ", ".join(str(e) for e in errors),
        "reason": "Invalid",
        "details": {
            "name": name,
            "kind": kind,
            "causes": [
                {"reason": "FieldValueInvalid", "message": str(e), "field": e.field} for e in errors
            ],
        },
        "code": 422,
    }
