"""A real Prometheus scrapes the monitor and a model server, and evaluates every expression
of the dashboard and the alert rules; promtool checks the rules."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.integration.models import ModelServer, train_digits
from tests.integration.processes import ServiceProcess
from tests.unit.test_monitoring_assets import ALERTS, alert_expressions, dashboard_expressions
from torchrelay.shared.testing import assert_eventually

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning"),
]


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is required in CI (Debian package prometheus)")
        pytest.skip(f"{name} is not installed (apt-get install prometheus)")
    return path


def test_promtool_accepts_the_alert_rules() -> None:
    result = subprocess.run(
        [binary("promtool"), "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rules = yaml.safe_load(ALERTS.read_text())
    count = sum(len(group["rules"]) for group in rules["groups"])
    assert f"SUCCESS: {count} rules found" in result.stdout, "every rule was read"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def targets(nats_url: str, tmp_path: Path) -> Iterator[tuple[int, int]]:
    model_dir = asyncio.run(train_digits(tmp_path / "storage", "scraped", epochs=1))
    server = ModelServer(model_dir, tmp_path / "server.log")
    monitor = ServiceProcess(
        ["-m", "torchrelay", "service", "monitor", "--nats-url", nats_url, "--http-port", "0"],
        tmp_path / "monitor.log",
    )
    try:
        server_port = server.wait_ready()
        monitor_port = asyncio.run(monitor.wait_ready())
        yield monitor_port, server_port
    finally:
        monitor.stop()
        server.stop()


async def test_prometheus_scrapes_and_evaluates_every_expression(
    targets: tuple[int, int], tmp_path: Path
) -> None:
    monitor_port, server_port = targets
    web_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files: ['{ALERTS}']\n"
        "scrape_configs:\n"
        f"  - job_name: monitor\n    static_configs: [{{targets: ['127.0.0.1:{monitor_port}']}}]\n"
        f"  - job_name: model\n    static_configs: [{{targets: ['127.0.0.1:{server_port}']}}]\n"
    )
    base = f"http://127.0.0.1:{web_port}/api/v1"
    with start_prometheus(config, tmp_path, web_port):
        async with aiohttp.ClientSession() as http:

            async def both_up() -> bool:
                try:
                    async with http.get(f"{base}/targets") as response:
                        active = (await response.json())["data"]["activeTargets"]
                except (aiohttp.ClientError, KeyError):
                    return False
                return len(active) == 2 and all(t["health"] == "up" for t in active)

            await assert_eventually(both_up, timeout_s=60, interval_s=0.5)
            body = {
                "inputs": [
                    {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}
                ]
            }
            async with http.post(
                f"http://127.0.0.1:{server_port}/v2/models/digits/infer", json=body
            ) as r:
                assert r.status == 200
            for expression in dashboard_expressions() + alert_expressions():
                async with http.get(f"{base}/query", params={"query": expression}) as response:
                    answer = await response.json()
                assert answer["status"] == "success", (expression, answer)
            async with http.get(f"{base}/query", params={"query": "torchrelay_service_ready"}) as r:
                ready = (await r.json())["data"]["result"]
            assert [series["value"][1] for series in ready] == ["1"]
            async with http.get(f"{base}/rules") as response:
                groups = (await response.json())["data"]["groups"]
            assert {rule["health"] for group in groups for rule in group["rules"]} <= {
                "ok",
                "unknown",
            }


@contextlib.contextmanager
def start_prometheus(config: Path, folder: Path, port: int) -> Iterator[None]:
    with (folder / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [
                binary("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            yield
        finally:
            process.terminate()
            process.wait(10)
