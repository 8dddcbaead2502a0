"""Every name and label value the Kubernetes backends derive from a run id, a model or a version
is one the API server accepts (apimachinery's rules, not kubernetes-validate's, which checks
none), for any text: leading digits, upper case, dots, underscores, 200 characters."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from torchrelay.shared.cluster.kubernetes.manifests import (
    dns_name,
    job_name,
    label_value,
    model_deployment,
    model_object_name,
    model_service,
    rendezvous_service,
    training_job,
    version_label,
)
from torchrelay.shared.cluster.kubernetes.options import KubeOptions
from torchrelay.shared.cluster.port import WorkerJob
from torchrelay.shared.events.data import TrainJobSpec

# k8s.io/apimachinery/pkg/util/validation, verbatim.
DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
OPTIONS = KubeOptions()
ANY_TEXT = st.text(min_size=1, max_size=200)
RUN_IDS = ANY_TEXT | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}", fullmatch=True)
# Models and versions are also folders on the storage: any text that is one path segment.
SEGMENTS = st.text(
    alphabet=st.characters(blacklist_characters="/\0"), min_size=1, max_size=200
).filter(lambda text: text not in {".", ".."})


def is_service_name(name: str) -> bool:
    return len(name) <= 63 and DNS1035.fullmatch(name) is not None


def is_label_value(value: str) -> bool:
    return len(value) <= 63 and LABEL_VALUE.fullmatch(value) is not None


def labels_of(obj: dict[str, Any]) -> list[str]:
    values = list(obj["metadata"].get("labels", {}).values())
    template = obj.get("spec", {}).get("template")
    if template:
        values += template["metadata"]["labels"].values()
    for key in ("selector",):
        selector = obj.get("spec", {}).get(key) or {}
        values += selector.get("matchLabels", selector).values()
    return values


def worker_job(run_id: str, attempt: int, world_size: int) -> WorkerJob:
    spec = TrainJobSpec.model_validate(
        {
            "entrypoint": "torchrelay.services.train.examples.digits:train",
            "model_name": "digits",
            "world_size": world_size,
            "dataset": {"name": "digits", "version": "v1"},
        }
    )
    return WorkerJob(
        run_id=run_id, attempt=attempt, job=spec, dataset_path="d", storage_root="/storage"
    )


@given(run_id=RUN_IDS, attempt=st.integers(min_value=0, max_value=10**6))
@example(run_id="1pipeline.train", attempt=0)  # the 422 of issue 16: a leading digit
@example(run_id="Pipe_1.Train:retry" * 11, attempt=99)
@example(run_id="---", attempt=0)
def test_a_training_attempt_has_valid_names_for_any_run_id(run_id: str, attempt: int) -> None:
    job = training_job(worker_job(run_id, attempt, world_size=1024), OPTIONS)
    service = rendezvous_service(job, job_uid="uid-1")
    name = job["metadata"]["name"]
    assert name == job_name(run_id, attempt), "stable: the same id, the same name"
    assert is_service_name(service["metadata"]["name"]), "the headless Service: DNS-1035"
    pod = job["spec"]["template"]["spec"]
    assert is_service_name(pod["subdomain"])
    assert pod["subdomain"] == service["metadata"]["name"] == name
    last_host = f"{name}-1023"  # the highest rank's host name
    assert len(last_host) <= 63
    assert DNS1123_LABEL.fullmatch(last_host)
    rendezvous = f"{last_host}.{name}.{OPTIONS.namespace}.svc"
    assert len(rendezvous) <= 253
    assert DNS1123_SUBDOMAIN.fullmatch(rendezvous)
    for obj in (job, service):
        assert all(is_label_value(v) for v in labels_of(obj)), obj["metadata"]
    assert job["metadata"]["annotations"]["torchrelay.io/run-id"] == run_id, "the id itself"


@given(model=SEGMENTS, version=SEGMENTS)
@example(model="digits", version="v1.")  # versions may end in a dot; label values may not
@example(model="2024-digits", version="v" * 64)
@example(model="Digits_V2", version="-")
@example(model="\ud800", version="v1")  # a lone surrogate: no UTF-8, still a name
def test_a_served_model_has_valid_names_and_labels_for_any_model_and_version(
    model: str, version: str
) -> None:
    deployment = model_deployment(
        model,
        version,
        2,
        options=OPTIONS,
        storage_root="/storage",
        server_args=[],
        progress_deadline_s=600,
    )
    service = model_service(model, OPTIONS)
    assert deployment["metadata"]["name"] == service["metadata"]["name"]
    assert is_service_name(service["metadata"]["name"])
    for obj in (deployment, service):
        assert all(is_label_value(v) for v in labels_of(obj)), obj["metadata"]
    assert deployment["spec"]["template"]["metadata"]["annotations"]["torchrelay.io/version"] == (
        version
    )


def test_names_earlier_releases_gave_stay_the_same() -> None:
    """Running Jobs and served models are found again by name after an upgrade."""
    assert job_name("pipe-1.train", 0) == "pipe-1-train-b7694dcc65-a0"
    assert job_name("Pipe_1.Train:retry" * 3, 2) == "pipe-1-train-retrypipe-1-train-a58d672a4d-a2"
    assert model_object_name("digits") == "model-digits"
    assert model_object_name("m" * 63) == f"model-{'m' * 45}-6e80a1cca9"
    assert version_label("v1.2_rc-3") == "v1.2_rc-3"
    assert version_label("v1." + "x" * 61) == f"v1.{'x' * 47}-6b8c80e23f10"
    assert label_value("A.b_c-9") == "A.b_c-9"


@given(first=ANY_TEXT, second=ANY_TEXT)
def test_different_ids_get_different_names(first: str, second: str) -> None:
    if first != second:
        assert dns_name(first, prefix="run") != dns_name(second, prefix="run")
        assert label_value(first) != label_value(second)


def test_ids_that_sanitise_alike_are_told_apart_by_the_hash() -> None:
    assert job_name("r", 0) != job_name("R", 0)
    assert job_name("run.1", 0) != job_name("run_1", 0)
    assert model_object_name("A") != model_object_name("a")
    assert label_value("x" * 64) != label_value("x" * 65)


def test_a_name_that_starts_with_a_digit_gets_a_letter_first() -> None:
    name = job_name("1pipeline.train", 0)
    assert name.startswith("run-1pipeline-train-")
    assert name.endswith("-a0")


def test_a_length_too_short_for_a_prefix_and_a_hash_is_refused() -> None:
    with pytest.raises(ValueError, match="no DNS label of 12 characters"):
        dns_name("anything", prefix="run", max_length=12)
