"""compose.yaml runs the real services, built from their Dockerfiles, with settings they
understand, next to Prometheus (scraping them, with the alert rules) and Grafana (with the
dashboard). No Docker engine here: the file is parsed and checked against the code."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from torchrelay import __version__
from torchrelay.cli import SERVICES

ROOT = Path(__file__).parents[2]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TORCHRELAY = {n: s for n, s in COMPOSE["services"].items() if "build" in s}


def settings_of(service: str, environment: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    module = importlib.import_module(f"torchrelay.services.{service}.settings")
    settings_type = next(
        value for key, value in vars(module).items()
        if key.endswith("Settings") and value.__module__ == module.__name__
    )  # fmt: skip
    return settings_type()  # reads the compose environment; raises if it is invalid


def test_the_four_services_are_built_from_their_own_dockerfiles() -> None:
    assert set(TORCHRELAY) == set(SERVICES)
    for name, service in TORCHRELAY.items():
        assert service["command"] == ["service", name]
        assert service["build"] == {"context": ".", "dockerfile": f"services/{name}/Dockerfile"}
        assert service["image"] == f"torchrelay/{name}:{__version__}"
        dockerfile = (ROOT / service["build"]["dockerfile"]).read_text()
        assert "USER 10001:10001" in dockerfile, "non-root"
        # train runs sweeps: Optuna (the sweeps extra) suggests a bayesian sweep's trials.
        extras = {"train": ",kubernetes,sweeps", "serve": ",kubernetes"}.get(name, "")
        install = f'pip install ".[{name}{extras}]"'
        assert install in dockerfile
        if name in ("ingest", "monitor"):
            assert "torch==" not in dockerfile
            extra = PYPROJECT["project"]["optional-dependencies"][name]
            assert not any(d.startswith("torch") for d in extra), f"{name} carries no torch"
        else:
            assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in dockerfile
            assert "torch==2.13.0" in dockerfile


def test_every_service_gets_settings_it_understands_and_its_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, service in TORCHRELAY.items():
        settings = settings_of(name, service["environment"], monkeypatch)
        assert settings.nats.url == "nats://nats:4222"
        assert settings.http.host == "0.0.0.0"
        port = settings.http.port
        assert service["ports"] == [f"{port}:{port}"]
        assert f"EXPOSE {port}\n" in (ROOT / "services" / name / "Dockerfile").read_text()
        assert "nats" in service["depends_on"]
        mounts = dict(volume.split(":")[:2] for volume in service["volumes"])
        if name != "monitor":
            assert mounts["storage"] == str(settings.storage_root), "the shared storage"
        assert service["stop_grace_period"] == "30s"
        assert settings.shutdown.deadline_s < 30


def test_storage_is_a_named_volume_shared_by_the_services_that_use_files() -> None:
    assert "storage" in COMPOSE["volumes"]
    users = {
        n for n, s in TORCHRELAY.items() if any(v.startswith("storage:") for v in s["volumes"])
    }
    assert users == {"ingest", "train", "serve"}


def test_prometheus_scrapes_every_service_and_loads_the_alert_rules() -> None:
    prometheus = COMPOSE["services"]["prometheus"]
    config = yaml.safe_load((ROOT / "compose" / "prometheus.yml").read_text())
    (torchrelay,) = [job for job in config["scrape_configs"] if job["job_name"] == "torchrelay"]
    targets = set(torchrelay["static_configs"][0]["targets"])
    expected = set()
    for name, service in TORCHRELAY.items():
        expected.add(f"{name}:{service['environment']['TORCHRELAY_HTTP_PORT']}")
    assert targets == expected
    mounts = dict(volume.split(":")[:2] for volume in prometheus["volumes"])
    assert mounts["./k8s/base/monitoring/alerts.yaml"] in config["rule_files"]


def test_grafana_is_provisioned_with_the_data_source_and_the_dashboard() -> None:
    grafana = COMPOSE["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    provisioning = ROOT / "compose" / "grafana" / "provisioning"
    assert mounts["./compose/grafana/provisioning"] == "/etc/grafana/provisioning"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards" / "torchrelay.yaml").read_text())
    folder = provider["providers"][0]["options"]["path"]
    assert mounts["./k8s/base/monitoring/grafana-dashboard.json"].startswith(folder + "/")


def test_every_file_compose_mounts_exists() -> None:
    for name, service in COMPOSE["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and source != "./sources":  # ./sources: your data
                assert (ROOT / source).exists(), f"{name} mounts {source}"


def test_promtool_accepts_the_prometheus_configuration(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs prometheus")
        pytest.skip("promtool is not installed")
    config = (ROOT / "compose" / "prometheus.yml").read_text()
    rules = ROOT / "k8s" / "base" / "monitoring" / "alerts.yaml"
    local = tmp_path / "prometheus.yml"
    local.write_text(config.replace("/etc/prometheus/rules/alerts.yaml", str(rules)))
    checked = subprocess.run(
        [promtool, "check", "config", str(local)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_storage_volume_is_handed_to_the_services_user_before_they_start() -> None:
    """Docker creates a named volume owned by root; the services run as 10001."""
    init = COMPOSE["services"]["storage-init"]
    assert init["user"] == "0:0"
    assert init["command"] == ["chown", "10001:10001", "/storage"]
    assert init["volumes"] == ["storage:/storage"]
    for name, service in TORCHRELAY.items():
        if any(v.startswith("storage:") for v in service["volumes"]):
            assert "storage:/storage" in service["volumes"], name
            condition = service["depends_on"]["storage-init"]["condition"]
            assert condition == "service_completed_successfully", name
        dockerfile = (ROOT / "services" / name / "Dockerfile").read_text()
        assert "USER 10001:10001" in dockerfile, "the owner storage-init sets"


def test_the_services_have_a_writable_home_on_their_read_only_root() -> None:
    for name, service in TORCHRELAY.items():
        assert service["read_only"] is True, name
        home = service["environment"]["HOME"]
        assert home in service["tmpfs"], f"{name}: HOME is not writable"
        assert "/tmp" in service["tmpfs"], name  # noqa: S108 - a tmpfs


def test_prometheus_scrapes_nats_through_the_exporter_not_its_json_endpoints() -> None:
    config = yaml.safe_load((ROOT / "compose" / "prometheus.yml").read_text())
    json_endpoints = ("/varz", "/jsz", "/connz", "/routez", "/healthz", "/subsz")
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") not in json_endpoints, job["job_name"]
        for target in job["static_configs"][0]["targets"]:
            assert not target.endswith(":8222"), f"{job['job_name']} scrapes NATS monitoring"
    (nats,) = [job for job in config["scrape_configs"] if job["job_name"] == "nats"]
    (target,) = nats["static_configs"][0]["targets"]
    host, _, port = target.partition(":")
    exporter = COMPOSE["services"][host]
    assert exporter["image"].startswith("natsio/prometheus-nats-exporter:")
    assert port == "7777", "the exporter's default port"
    assert exporter["command"][-1] == "http://nats:8222"
    assert "-m" in COMPOSE["services"]["nats"]["command"], "NATS serves its monitoring port"
