"""Who may say what: every fact has one owner, outsiders only ask, nobody inherits another's
identity."""

from __future__ import annotations

from pathlib import Path

import pytest

from torchrelay.platform import service_env
from torchrelay.shared.bus import principals
from torchrelay.shared.cluster.local import LocalBackend, _inheritable
from torchrelay.shared.cluster.port import WorkerJob
from torchrelay.shared.events import EVENT_TYPES, DeadLettered
from torchrelay.shared.events.data import DatasetRef, TrainJobSpec

PASSWORDS = {user: f"pw-{user}" for user in principals.USERS}


def _allowed(user: str) -> set[str]:
    allowed = principals.permissions(user)
    assert allowed is not None
    return set(allowed.publish_allow)


def test_every_fact_has_an_owner_and_every_request_is_open_to_outsiders() -> None:
    requests = {cls.nats_subject for cls in principals.request_events()}
    facts = {
        cls.nats_subject
        for cls in [
            *principals.WORKER_FACTS,
            *(c for e in principals.SERVICE_FACTS.values() for c in e),
        ]
    }
    every = {cls.nats_subject for cls in EVENT_TYPES.values()} - {DeadLettered.nats_subject}
    assert every - facts - requests == set(), "an event type nobody may publish"
    assert "torchrelay.pipeline.submitted" in requests
    assert all(s.endswith(".requested") for s in requests - {"torchrelay.pipeline.submitted"})


def test_an_outside_publisher_may_only_ask() -> None:
    allowed = _allowed(principals.PUBLISHER)
    facts = {cls.nats_subject for events in principals.SERVICE_FACTS.values() for cls in events}
    facts -= {cls.nats_subject for cls in principals.request_events()}
    assert not allowed & facts
    assert not any(subject.startswith(("$KV", "$JS.ACK")) for subject in allowed)
    assert not any(subject.startswith("$JS.API.CONSUMER") for subject in allowed), (
        "fetching from a service's consumer would steal its events"
    )


def test_a_service_states_only_its_own_facts() -> None:
    ingest, train = _allowed("ingest"), _allowed("train")
    assert "torchrelay.dataset.staged" in ingest
    assert "torchrelay.train.completed" not in ingest
    assert "torchrelay.train.completed" in train
    assert "torchrelay.model.deployed" not in train
    assert "torchrelay.deadletter" in ingest & train


def test_workers_report_progress_and_checkpoints_only() -> None:
    assert _allowed(principals.WORKER) == {
        "torchrelay.train.progress",
        "torchrelay.train.checkpointed",
    }


def test_each_user_reads_replies_only_under_its_own_inbox_prefix() -> None:
    for user in (*principals.SERVICES, principals.WORKER):
        allowed = principals.permissions(user)
        assert allowed is not None
        assert allowed.subscribe_allow == (f"_INBOX_{user}.>",)


def test_destructive_stream_operations_are_denied_to_services() -> None:
    allowed = principals.permissions("monitor")
    assert allowed is not None
    assert "$JS.API.STREAM.DELETE.>" in allowed.publish_deny
    assert "$JS.API.STREAM.PURGE.>" in allowed.publish_deny


def test_unknown_users_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown NATS user"):
        principals.permissions("intruder")


def test_a_service_connects_as_itself_never_with_credentials_from_the_shell() -> None:
    shell = {"PATH": "/bin", "TORCHRELAY_NATS_TOKEN": "admin-token", "TORCHRELAY_NATS_USER": "x"}
    env = service_env("serve", PASSWORDS, shell)
    assert env["TORCHRELAY_NATS_USER"] == "serve"
    assert env["TORCHRELAY_NATS_PASSWORD"] == "pw-serve"
    assert env["TORCHRELAY_NATS_INBOX_PREFIX"] == "_INBOX_serve"
    assert "TORCHRELAY_NATS_TOKEN" not in env
    assert env["PATH"] == "/bin"
    assert "TORCHRELAY_TRAIN_WORKER_NATS_USER" not in env


def test_train_hands_its_workers_their_own_user() -> None:
    env = service_env("train", PASSWORDS, {})
    assert env["TORCHRELAY_TRAIN_WORKER_NATS_USER"] == "worker"
    assert env["TORCHRELAY_TRAIN_WORKER_NATS_PASSWORD"] == "pw-worker"


def test_without_authorization_the_environment_passes_as_it_is() -> None:
    assert service_env("train", None, {"TORCHRELAY_NATS_TOKEN": "t"}) == {
        "TORCHRELAY_NATS_TOKEN": "t"
    }


def test_local_workers_report_as_the_worker_user_not_as_train(tmp_path: Path) -> None:
    worker_env = {"TORCHRELAY_NATS_USER": "worker", "TORCHRELAY_NATS_PASSWORD": "pw-worker"}
    backend = LocalBackend(max_world_size=2, worker_env=worker_env)
    job = WorkerJob(
        run_id="r1",
        attempt=0,
        job=TrainJobSpec(
            entrypoint="torchrelay.services.train.examples.digits:train",
            model_name="digits",
            world_size=2,
            dataset=DatasetRef(name="digits", version="v1"),
        ),
        dataset_path="datasets/digits/v1",
        storage_root=str(tmp_path),
        nats_url="nats://127.0.0.1:4222",
    )
    for rank in backend.dryrun(job).ranks:
        assert rank.env["TORCHRELAY_NATS_USER"] == "worker"
    inherited = _inheritable(
        {
            "TORCHRELAY_NATS_USER": "train",
            "TORCHRELAY_NATS_PASSWORD": "pw-train",
            "TORCHRELAY_NATS_TLS_CA_FILE": "/ca.pem",
            "HOME": "/root",
        }
    )
    assert inherited == {"TORCHRELAY_NATS_TLS_CA_FILE": "/ca.pem", "HOME": "/root"}


def test_rank_zero_reports_with_the_identity_its_backend_gave_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torchrelay.services.train.worker.report import worker_nats_settings

    monkeypatch.setenv("TORCHRELAY_NATS_USER", "worker")
    monkeypatch.setenv("TORCHRELAY_NATS_PASSWORD", "pw-worker")
    monkeypatch.setenv("TORCHRELAY_NATS_INBOX_PREFIX", "_INBOX_worker")
    settings = worker_nats_settings("nats://127.0.0.1:4222")
    assert settings.url == "nats://127.0.0.1:4222"
    assert settings.user == "worker"
    assert settings.password is not None
    assert settings.password.get_secret_value() == "pw-worker"
    assert settings.inbox_prefix == "_INBOX_worker"


def test_urls_carry_credentials_for_shells_and_never_show_them_in_logs() -> None:
    from torchrelay.shared.bus.connection import redact, with_credentials

    url = with_credentials("nats://127.0.0.1:4222", "publisher", "s3cr/et@")
    assert url == "nats://publisher:s3cr%2Fet%40@127.0.0.1:4222"
    assert with_credentials(url, "admin", "x") == "nats://admin:x@127.0.0.1:4222"
    assert (
        redact(f"{url},nats://other:4222")
        == "nats://publisher:***@127.0.0.1:4222,nats://other:4222"
    )
    assert "s3cr" not in redact(url)


def test_an_undeploy_is_asked_by_outsiders_and_the_operator_and_said_done_by_serve_alone() -> None:
    assert "torchrelay.model.undeploy.requested" in _allowed(principals.PUBLISHER)
    assert principals.permissions(principals.ADMIN) is None, "the operator may say anything"
    fact = "torchrelay.model.undeployed"
    sayers = {user for user in principals.SERVICES if fact in _allowed(user)}
    assert sayers == {"serve"}
    assert "torchrelay.model.undeployed" not in _allowed(principals.PUBLISHER)
