"""The emulated API server's name and label rules are apimachinery's: what a real cluster
refuses with 422, the emulator refuses too."""

from __future__ import annotations

import pytest

from tests.kube.validation import (
    dns1035_label,
    dns1123_label,
    dns1123_subdomain,
    invalid_status,
    label_key,
    label_value,
    validate,
)


def service(name: str, labels: dict[str, str] | None = None) -> dict[str, object]:
    return {"metadata": {"name": name, "labels": labels or {}}, "spec": {"selector": {}}}


@pytest.mark.parametrize("name", ["a", "run-1", "a" * 63, "abc-123"])
def test_a_service_name_is_a_dns_1035_label(name: str) -> None:
    assert dns1035_label(name) == []
    assert validate("services", service(name)) == []


@pytest.mark.parametrize(
    "name", ["1run-abc", "-run", "run-", "Run", "run.one", "run_one", "a" * 64, ""]
)
def test_a_service_name_that_is_not_a_dns_1035_label_is_refused(name: str) -> None:
    errors = validate("services", service(name))
    assert errors, name
    assert all(e.field == "metadata.name" for e in errors)


def test_a_leading_digit_is_fine_for_pods_and_jobs_but_not_for_services() -> None:
    assert dns1123_subdomain("1run-abc-0") == []
    assert validate("jobs", {"metadata": {"name": "1run-abc"}}) == []
    assert "DNS-1035" in str(validate("services", service("1run-abc"))[0])


def test_most_names_are_dns_1123_subdomains_up_to_253_characters() -> None:
    assert dns1123_subdomain("a.b-c.d") == []
    assert dns1123_subdomain(".".join(["a" * 63] * 3)) == []  # 191 characters
    assert dns1123_subdomain(".".join(["a" * 63] * 4)) == [  # 255
        "must be no more than 253 characters"
    ]
    assert validate("pods", {"metadata": {"name": "Pod_1"}})
    assert validate("deployments", {"metadata": {"name": "model-x.."}})


def test_a_job_name_is_also_a_label_value_of_at_most_63_characters() -> None:
    (error,) = validate("jobs", {"metadata": {"name": "j" * 64}})
    assert error.detail == "must be no more than 63 characters"
    assert validate("pods", {"metadata": {"name": "p" * 64}}) == []


def test_a_pods_hostname_and_subdomain_are_dns_1123_labels() -> None:
    job = {
        "metadata": {"name": "train"},
        "spec": {"template": {"metadata": {}, "spec": {"subdomain": "Train.x"}}},
    }
    (error,) = validate("jobs", job)
    assert error.field == "spec.template.spec.subdomain"
    assert dns1123_label("train-0") == []
    assert dns1123_label("x" * 64) == ["must be no more than 63 characters"]


@pytest.mark.parametrize(
    "key",
    ["app", "torchrelay.io/run", "batch.kubernetes.io/job-completion-index", "A_b.c", "k" * 63],
)
def test_valid_label_keys(key: str) -> None:
    assert label_key(key) == []


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("/run", "prefix part must be non-empty"),
        ("torchrelay.io/", "name part must be non-empty"),
        ("Torchrelay.IO/run", "prefix part a lowercase RFC 1123 subdomain"),
        ("-run", "name part must consist of"),
        ("k" * 64, "name part must be no more than 63 characters"),
    ],
)
def test_invalid_label_keys_say_which_part_is_wrong(key: str, why: str) -> None:
    assert any(problem.startswith(why) for problem in label_key(key)), label_key(key)


def test_label_values_are_empty_or_63_characters_of_the_label_alphabet() -> None:
    assert label_value("") == []
    assert label_value("v1.2_3-X") == []
    assert label_value("v" * 64) == ["must be no more than 63 characters"]
    assert label_value("a b")
    assert label_value("-a")


def test_labels_are_checked_on_the_object_its_template_and_its_selector() -> None:
    deployment = {
        "metadata": {"name": "model-x", "labels": {"ok": "v" * 64}},
        "spec": {
            "selector": {"matchLabels": {"bad key!": "x"}},
            "template": {"metadata": {"labels": {"version": "1 2"}}, "spec": {}},
        },
    }
    fields = {e.field for e in validate("deployments", deployment)}
    assert fields == {
        "metadata.labels[ok]",
        "spec.selector.matchLabels",
        "spec.template.metadata.labels[version]",
    }


def test_the_422_body_names_each_field_as_the_api_server_does() -> None:
    errors = validate("services", service("9abc"))
    body = invalid_status("Service", "9abc", errors)
    assert body["code"] == 422
    assert body["reason"] == "Invalid"
    assert str(body["message"]).startswith(
        'Service "9abc" is invalid: metadata.name: Invalid value: "9abc": a DNS-1035 label'
    )
    assert body["details"]["causes"] == [
        {"reason": "FieldValueInvalid", "message": str(errors[0]), "field": "metadata.name"}
    ]
