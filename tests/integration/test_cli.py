"""The torchrelay command: schema export, service selection, settings errors, run logs, and
predict against a deployed model that declares its labels and input scaling."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import nats
import numpy as np
import pytest

from tests.integration.labelled_models import export_toy
from tests.integration.models import ModelServer
from tests.integration.processes import cli
from tests.integration.tiny_models import export_digits
from torchrelay.services.serve.domain import DeploymentRecord
from torchrelay.shared.events import EVENT_TYPES
from torchrelay.shared.state import KvState, key_part
from torchrelay.shared.storage import Layout


def test_schema_export_writes_a_schema_per_event_and_an_asyncapi_document(tmp_path: Path) -> None:
    result = cli("schema", "export", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "asyncapi.json" in files
    assert "pipeline.schema.json" in files
    assert len(files) == len(EVENT_TYPES) + 2
    for name in files:
        document = json.loads((tmp_path / "out" / name).read_text())
        if name != "asyncapi.json":
            jsonschema.Draft202012Validator.check_schema(document)


def test_bad_settings_exit_2_naming_the_variable(tmp_path: Path) -> None:
    result = cli(
        "service",
        "monitor",
        env={"TORCHRELAY_SHUTDOWN_GRACE_S": "50", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "TORCHRELAY_SHUTDOWN" in result.stderr
    assert "grace_s" in result.stderr


def test_an_unreachable_nats_is_a_clear_error() -> None:
    # Port 9 (discard) is closed on loopback: nothing listens there.
    result = cli(
        "service",
        "monitor",
        "--nats-url",
        "nats://127.0.0.1:9",
        "--http-port",
        "0",
        env={**os.environ, "TORCHRELAY_NATS_STARTUP_WAIT_S": "1.5"},
    )
    assert result.returncode == 2
    assert "cannot reach NATS at nats://127.0.0.1:9" in result.stderr


def test_unknown_service_is_a_usage_error() -> None:
    result = cli("service", "nope")
    assert result.returncode == 2
    assert "'nope' is not one of 'ingest', 'monitor', 'serve', 'train'" in result.stderr


def test_logs_prints_every_attempts_rank_logs_from_the_storage(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "state" / "storage")  # where a stopped platform kept it
    for attempt, rank in [(0, 0), (0, 1), (1, 0)]:
        log = layout.rank_log("r1", attempt, rank)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"line of {attempt}/{rank}\n")
    shown = cli("logs", "r1", "--state-dir", str(tmp_path / "state"))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == [
        "==> attempt-0/rank-0.log <==",
        "line of 0/0",
        "==> attempt-0/rank-1.log <==",
        "line of 0/1",
        "==> attempt-1/rank-0.log <==",
        "line of 1/0",
    ]
    assert cli("logs", "r2", "--state-dir", str(tmp_path / "state")).returncode == 1
    escaping = cli("logs", "..", "--state-dir", str(tmp_path / "state"))
    assert escaping.returncode == 2
    assert "not a single path segment" in escaping.stderr


async def deploy(nats_url: str, model: str, version: str, port: int) -> None:
    """The deployment record the serve service keeps for a model served on ``port``."""
    nc = await nats.connect(nats_url)
    try:
        deployments = (await KvState.open(nc.jetstream())).store("deployments", DeploymentRecord)
        record = DeploymentRecord(
            model=model,
            active_version=version,
            endpoint=f"http://127.0.0.1:{port}/v2/models/{model}",
            status="deployed",
            updated=datetime.now(UTC),
        )
        await deployments.put(key_part(model), record)
    finally:
        await nc.close()


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
async def test_predict_scales_the_input_as_declared_and_names_the_answer(
    nats_url: str, tmp_path: Path
) -> None:
    server = ModelServer(export_toy(tmp_path / "storage"), tmp_path / "server.log")
    try:
        await deploy(nats_url, "toy", "r1", server.wait_ready())
        (tmp_path / "one.json").write_text(json.dumps([16, 48, 32, 0]))
        np.save(tmp_path / "two.npy", np.array([[16, 48, 32, 0], [16, 160, 0, 0]]))

        def predict(*argv: str) -> subprocess.CompletedProcess[str]:
            return cli("predict", "toy", *argv, "--nats-url", nats_url)

        # raw [16, 48, 32, 0] -> scaled [0, 2, 1, -1] -> logits [0, 2, 6]: eel, by softmax
        shown = predict(str(tmp_path / "one.json"))
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.splitlines() == [
            "input scaled as the model declares: x * 0.0625 - 1 (counts 0..32)",
            "scores: softmax of the model's outputs (they look like logits)",
            "input 0: eel    top 3: eel 0.980  dog 0.018  cat 0.002",
        ]
        # unscaled, the same input is logits [16, 48, 37]: dog
        raw = predict(str(tmp_path / "one.json"), "--raw")
        assert raw.returncode == 0, raw.stderr
        assert raw.stdout.splitlines()[1].startswith("input 0: dog    top 3: dog 1.000  eel")

        batch = predict(str(tmp_path / "two.npy"), "--batched", "--json")
        assert batch.returncode == 0, batch.stderr
        answer = json.loads(batch.stdout)
        assert answer["model_name"] == "toy"
        assert answer["outputs"][0]["shape"] == [2, 3]
        assert answer["outputs"][0]["data"][:3] == pytest.approx([0.0, 2.0, 6.0])
        assert answer["scores"] == "softmax"
        assert [p["label"] for p in answer["predictions"]] == ["eel", "dog"]
        assert [t["label"] for t in answer["predictions"][1]["top"]] == ["dog", "eel", "cat"]

        wrong = predict(str(tmp_path / "one.json"), "--batched")
        assert wrong.returncode == 2
        assert "the input is a batch of shape [4]; model 'toy' takes shape [-1, 4]" in wrong.stderr
        assert wrong.stdout == ""
    finally:
        server.stop()


async def test_predict_prints_the_answer_of_a_model_without_labels_as_it_is(
    nats_url: str, tmp_path: Path
) -> None:
    server = ModelServer(export_digits(tmp_path, "plain", "v1"), tmp_path / "server.log")
    try:
        await deploy(nats_url, "plain", "v1", server.wait_ready())
        (tmp_path / "image.json").write_text(json.dumps([[[0.0] * 8] * 8]))
        shown = cli("predict", "plain", str(tmp_path / "image.json"), "--nats-url", nats_url)
        assert shown.returncode == 0, shown.stderr
        answer = json.loads(shown.stdout)
        assert answer["model_name"] == "plain"
        assert answer["outputs"][0]["shape"] == [1, 10]
        assert "predictions" not in answer
    finally:
        server.stop()
