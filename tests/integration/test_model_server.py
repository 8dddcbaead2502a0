"""The model server: Open Inference Protocol v2, a stock client, batching, overload, bad input,
and rollout control on its admin socket only."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import torch
import tritonclient.http as triton

from tests.integration.models import ModelServer, train_digits
from torchrelay.services.serve.server.model import ModelLoadError, load_model
from torchrelay.shared.cluster import ModelVersion, Phase, Status
from torchrelay.shared.cluster.local_serving import (
    SUN_PATH_MAX,
    LocalServingBackend,
    socket_address,
)
from torchrelay.shared.cluster.registry import ServerOptions

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return asyncio.run(train_digits(tmp_path_factory.mktemp("storage"), "served"))


@pytest.fixture
def server(model_dir: Path, tmp_path: Path) -> Iterator[ModelServer]:
    process = ModelServer(model_dir, tmp_path / "server.log", "--max-body-bytes", "200000")
    process.wait_ready()
    yield process
    process.stop()


def digits(count: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((count, 1, 8, 8), dtype=np.float32)


def body(array: np.ndarray, **overrides: object) -> dict[str, object]:
    tensor = {
        "name": "input",
        "shape": list(array.shape),
        "datatype": "FP32",
        "data": array.ravel().tolist(),
    }
    return {"inputs": [{**tensor, **overrides}]}


@pytest.mark.parametrize("binary", [True, False], ids=["binary-tensors", "json-tensors"])
def test_a_stock_v2_client_round_trip(server: ModelServer, model_dir: Path, binary: bool) -> None:
    client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("digits")
        metadata = client.get_model_metadata("digits")
        assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
        batch = digits(3)
        tensor = triton.InferInput("input", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch, binary_data=binary)
        result = client.infer(
            "digits", [tensor], outputs=[triton.InferRequestedOutput("output", binary_data=binary)]
        )
        # And the client's defaults, unchanged: binary tensors both ways.
        default = triton.InferInput("input", list(batch.shape), "FP32")
        default.set_data_from_numpy(batch)
        assert client.infer("digits", [default]).as_numpy("output").shape == (3, 10)
        scores = result.as_numpy("output")
    finally:
        client.close()
    reference = (
        torch.jit.load(str(model_dir / "model.pt"))(torch.from_numpy(batch)).detach().numpy()
    )
    assert scores.shape == (3, 10)
    np.testing.assert_allclose(scores, reference, rtol=1e-5, atol=1e-5)


async def test_concurrent_requests_are_batched(server: ModelServer) -> None:
    url = f"http://127.0.0.1:{server.port}/v2/models/digits/infer"
    async with aiohttp.ClientSession() as http:

        async def one(i: int) -> int:
            async with http.post(url, json=body(digits(1)) | {"id": f"r{i}"}) as response:
                answer = await response.json()
                assert answer["id"] == f"r{i}"
                assert answer["outputs"][0]["shape"] == [1, 10]
                return response.status

        statuses = await asyncio.gather(*(one(i) for i in range(96)))
        assert set(statuses) == {200}
        async with http.get(f"http://127.0.0.1:{server.port}/metrics") as response:
            text = await response.text()
    calls = float(re.search(r'torchrelay_model_batch_size_count\{model="digits"\} (\S+)', text)[1])
    rows = float(re.search(r'torchrelay_model_batch_size_sum\{model="digits"\} (\S+)', text)[1])
    assert rows == 96
    assert calls < rows, f"{rows:.0f} rows ran in {calls:.0f} model calls: requests were merged"
    assert 'torchrelay_model_requests_total{model="digits",status="200"} 96.0' in text


async def test_overload_answers_503_at_once_and_the_server_stays_healthy(
    model_dir: Path, tmp_path: Path
) -> None:
    server = ModelServer(
        model_dir, tmp_path / "small.log", "--max-queue", "4", "--max-batch-size", "1"
    )
    try:
        await asyncio.to_thread(server.wait_ready)
        base = f"http://127.0.0.1:{server.port}"
        async with aiohttp.ClientSession() as http:

            async def one() -> tuple[int, str | None]:
                async with http.post(f"{base}/v2/models/digits/infer", json=body(digits(8))) as r:
                    await r.read()
                    return r.status, r.headers.get("Retry-After")

            results = await asyncio.gather(*(one() for _ in range(200)))
            statuses = [status for status, _ in results]
            assert 503 in statuses
            assert 200 in statuses
            assert all(retry == "1" for status, retry in results if status == 503)
            async with http.get(f"{base}/v2/health/ready") as r:
                assert r.status == 200
            status, _ = await one()
            assert status == 200
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (body(digits(1), shape=[1, 64]), "has shape [1, 64]; the model expects [-1, 1, 8, 8]"),
        (body(digits(1), datatype="INT64"), "datatype 'INT64'; the model expects FP32"),
        (body(digits(1), data=[1.0, 2.0]), "2 values for shape [1, 1, 8, 8]"),
        (body(digits(1), data=["a"] * 64), "data is not FP32"),
        (body(digits(1), name="pixels"), "named 'pixels'"),
        ({"inputs": "nope"}, "'inputs' must list 1 tensor"),
        (b"{not json", "the body is not JSON"),
        (body(digits(400)), "larger than 200000 bytes"),
    ],
)
async def test_malformed_infer_bodies_get_400_with_a_reason(
    server: ModelServer, payload: object, message: str
) -> None:
    url = f"http://127.0.0.1:{server.port}/v2/models/digits/infer"
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    async with aiohttp.ClientSession() as http, http.post(url, data=data) as response:
        answer = await response.json()
    assert response.status == 400
    assert message in answer["error"]


async def test_unknown_models_and_versions_are_404(server: ModelServer) -> None:
    base = f"http://127.0.0.1:{server.port}/v2/models"
    async with aiohttp.ClientSession() as http:
        for path in ("/other", "/digits/versions/v999", "/other/ready"):
            async with http.get(base + path) as response:
                assert response.status == 404
        async with http.get(f"{base}/digits/versions/served") as response:
            assert (await response.json())["versions"] == ["served"]


def description(**changes: object) -> dict[str, object]:
    """A model.json as the trainer writes it, with ``changes`` applied."""
    written: dict[str, object] = {
        "name": "digits",
        "version": "v1",
        "format": "torchscript",
        "model_class": None,
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 2]}],
        "metrics": {"accuracy": 0.5},
        "lineage": {
            "dataset": {"name": "digits", "version": "abc"},
            "run_id": "v1",
            "attempt": 0,
            "entrypoint": "tests.integration.trainers:train",
            "steps": 3,
        },
        "created": "2026-01-02T03:04:05.000006+00:00",
    }
    return {**written, **changes}


def test_a_model_that_fails_to_load_exits_with_the_reason(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.json").write_text(json.dumps(description()))
    (broken / "model.pt").write_bytes(b"not a model")
    server = ModelServer(broken, tmp_path / "broken.log")
    assert server.process.wait(60) == 3
    server.stop()
    assert "cannot load the model" in (tmp_path / "broken.log").read_text()


def test_an_invalid_model_description_exits_naming_the_file_and_field(tmp_path: Path) -> None:
    folder = tmp_path / "invalid"
    folder.mkdir()
    invalid = description()
    del invalid["lineage"]
    (folder / "model.json").write_text(json.dumps(invalid))
    server = ModelServer(folder, tmp_path / "invalid.log")
    assert server.process.wait(60) == 3
    server.stop()
    (failure,) = [
        json.loads(line)
        for line in (tmp_path / "invalid.log").read_text().splitlines()
        if '"model.load_failed"' in line
    ]
    assert str(folder / "model.json") in failure["error"]
    assert "lineage: Field required" in failure["error"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "no model description (model.json) here"),
        ("{not json", "not valid JSON"),
        ("[]", "(top): Input should be an object"),
        (json.dumps(description(format="onnx")), "format: Input should be 'torchscript'"),
        (json.dumps(description(inputs=[])), "inputs: Tuple should have at least 1 item"),
        (
            json.dumps(description(outputs=[{"name": "output", "shape": [-1, 2]}])),
            "outputs.0.datatype: Field required",
        ),
        (
            json.dumps(description(format="state_dict")),
            "format state_dict needs model_class",
        ),
        (json.dumps(description(surprise=1)), "surprise: Extra inputs are not permitted"),
        (
            json.dumps(
                description(inputs=[{"name": "input", "datatype": "torch.int4", "shape": [-1]}])
            ),
            "model.json inputs must name supported datatypes",
        ),
    ],
)
def test_an_invalid_model_folder_is_refused_with_the_reason(
    tmp_path: Path, content: str | None, reason: str
) -> None:
    if content is not None:
        (tmp_path / "model.json").write_text(content)
    with pytest.raises(ModelLoadError) as caught:
        load_model(tmp_path)
    assert reason in str(caught.value)
    if "datatypes" not in reason:
        assert str(tmp_path / "model.json") in str(caught.value), "names the file"


def test_a_model_json_of_todays_trainer_loads(model_dir: Path) -> None:
    loaded = load_model(model_dir)
    assert (loaded.name, loaded.version, loaded.platform) == (
        "digits",
        "served",
        "pytorch_torchscript",
    )
    assert loaded.inputs[0].shape == (-1, 1, 8, 8)


async def test_the_digits_model_declares_its_labels_and_pixel_scaling(
    server: ModelServer,
) -> None:
    base = f"http://127.0.0.1:{server.port}/v2/models/digits"
    async with aiohttp.ClientSession() as http:
        for url in (base, f"{base}/versions/served"):
            async with http.get(url) as response:
                parameters = (await response.json())["parameters"]
            assert json.loads(parameters["labels"]) == [str(digit) for digit in range(10)]
            assert parameters["preprocessing_scale"] == 1 / 16
            assert parameters["preprocessing_offset"] == 0.0


async def admin_post(admin: Path, action: str, **params: str) -> int:
    """POST a control request over the server's admin socket; returns the HTTP status."""
    with socket_address(admin) as address:
        connector = aiohttp.UnixConnector(path=address)
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            http.post(f"http://model-server/admin/{action}", params=params) as response,
        ):
            await response.read()
            return response.status


async def test_control_is_on_the_admin_socket_and_never_on_a_tcp_port(
    model_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "admin"
    folder.mkdir(mode=0o700)
    admin = folder / "server.sock"
    server = ModelServer(
        model_dir, tmp_path / "admin.log", "--admin-socket", str(admin), "--drain-s", "1"
    )
    # The model's stable port, reserved the way the serve service does: bound, never listening.
    stable = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stable.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    stable.bind(("127.0.0.1", 0))
    port = str(stable.getsockname()[1])
    try:
        await asyncio.to_thread(server.wait_ready)
        mode = admin.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600, f"the admin socket has mode {oct(mode)}"
        private = f"http://127.0.0.1:{server.port}"
        shared = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{private}/admin/serve-on", params={"port": port}) as r:
                assert r.status == 404
            with pytest.raises(aiohttp.ClientConnectorError):  # nobody joined the stable port
                async with http.get(f"{shared}/v2/health/ready"):
                    pass
            assert await admin_post(admin, "serve-on", port=port) == 200
            for base in (private, shared):
                for action in ("serve-on", "retire"):
                    async with http.post(f"{base}/admin/{action}", params={"port": port}) as r:
                        assert r.status == 404, f"{base}/admin/{action} answered {r.status}"
                async with http.post(f"{base}/v2/models/digits/infer", json=body(digits(1))) as r:
                    assert r.status == 200
        assert server.process.poll() is None, "control requests on TCP ports changed nothing"
        assert await admin_post(admin, "serve-on") == 400
        assert await admin_post(admin, "retire") == 200
        assert await asyncio.to_thread(server.process.wait, 30) == 0
        assert not admin.exists(), "a server that exits removes its admin socket"
    finally:
        stable.close()
        server.stop()


async def test_another_replica_retires_the_servers_through_their_admin_sockets(
    model_dir: Path, tmp_path: Path
) -> None:
    # A storage root deep enough that its sockets' paths cannot be socket addresses as they are.
    root = tmp_path / ("deep-" * 12) / "storage"
    await asyncio.to_thread(shutil.copytree, model_dir, root / "models" / "digits" / "served")
    owner = LocalServingBackend(root, options=ServerOptions(drain_s=1))
    other = LocalServingBackend(root)  # another serve replica on this machine
    try:
        request = owner.dryrun(ModelVersion(model="digits", version="served", replicas=2))
        handle = await owner.schedule(request)
        private_urls = await owner.ready(handle)
        endpoint = await owner.promote(handle)
        admins = [Path(server.admin_socket) for server in request.servers]
        assert all(len(os.fsencode(path)) > SUN_PATH_MAX for path in admins)
        assert {stat.S_IMODE(path.stat().st_mode) for path in admins} == {0o600}
        assert stat.S_IMODE(owner.admin_folder.stat().st_mode) == 0o700
        async with aiohttp.ClientSession() as http:
            for base in (endpoint.removesuffix("/v2/models/digits"), *private_urls):
                async with http.post(f"{base}/admin/retire") as r:
                    assert r.status == 404
            async with http.post(f"{endpoint}/infer", json=body(digits(1))) as r:
                assert r.status == 200
        processes = [server.process for server in owner._versions[handle].servers]
        assert all(process.returncode is None for process in processes)
        described = await other.describe(handle)  # it finds them through their admin sockets
        assert described is not None
        assert described.phase is Phase.RUNNING

        waiting = asyncio.create_task(owner.wait(handle))
        await other.cancel(handle)
        async with asyncio.timeout(30):
            codes = await asyncio.gather(*(process.wait() for process in processes))
            ended = await waiting
        assert codes == [0, 0], "retired: they drained and exited, nobody killed them"
        assert ended.status is Status.CANCELLED
        assert not any(path.exists() for path in admins)
        assert await other.describe(handle) is None
        await other.cancel(handle)  # servers gone: nothing to retire, and no error
    finally:
        await owner.aclose()
        await other.aclose()


async def test_a_staged_version_answers_by_its_version_only_until_the_switch(
    model_dir: Path, tmp_path: Path
) -> None:
    retrained = tmp_path / "retrained"
    shutil.copytree(model_dir, retrained)
    described = json.loads((retrained / "model.json").read_text())
    (retrained / "model.json").write_text(json.dumps({**described, "version": "retrained"}))
    other = tmp_path / "other"  # the same signature, another architecture
    shutil.copytree(retrained, other)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; exports still use it
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(linear).save(str(other / "model.pt"))  # type: ignore[no-untyped-call]
    admin = tmp_path / "admin.sock"
    server = ModelServer(model_dir, tmp_path / "swap.log", "--admin-socket", str(admin))
    try:
        await asyncio.to_thread(server.wait_ready)
        base = f"http://127.0.0.1:{server.port}/v2/models/digits"

        async def answered_by(path: str = "") -> str:
            async with (
                aiohttp.ClientSession() as http,
                http.post(f"{base}{path}/infer", json=body(digits(1))) as r,
            ):
                assert r.status == 200, await r.text()
                return str((await r.json())["model_version"])

        assert await admin_post(admin, "stage", **{"model-dir": str(other)}) == 409
        assert await admin_post(admin, "switch", version="retrained") == 409, "nothing staged"
        assert await admin_post(admin, "stage", **{"model-dir": str(retrained)}) == 200
        assert await answered_by() == "served", "traffic stays on the serving version"
        assert await answered_by("/versions/retrained") == "retrained", "the check reaches it"
        assert await admin_post(admin, "switch", version="retrained") == 200
        assert [await answered_by() for _ in range(3)] == ["retrained"] * 3
        # The old version stays staged (for a switch back) until the deployer unstages it.
        assert await answered_by("/versions/served") == "served"
        assert await admin_post(admin, "unstage") == 200
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{base}/versions/served/infer", json=body(digits(1))) as r,
        ):
            assert r.status == 404, (
                "a request pinned to the old version is never answered by another"
            )
        async with aiohttp.ClientSession() as http, http.get(base) as r:
            assert (await r.json())["versions"] == ["retrained"]
    finally:
        server.stop()
