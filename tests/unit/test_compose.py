"""compose.yaml runs real services with settings they understand."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from torchrelay.cli import SERVICES

ROOT = Path(__file__).parents[2]


def test_every_torchrelay_container_runs_a_known_service_with_valid_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    torchrelay = {n: s for n, s in compose["services"].items() if "build" in s}
    assert torchrelay, "compose.yaml runs at least one torchrelay service"
    for name, service in torchrelay.items():
        command = service["command"]
        assert command[0] == "service"
        assert command[1] in SERVICES, f"{name}: unknown service {command[1]}"
        assert service["build"]["args"]["EXTRAS"] == command[1], "image carries its own extras"
        assert "nats" in service["depends_on"]
        for key, value in service["environment"].items():
            monkeypatch.setenv(key, value)
        settings_module = importlib.import_module(f"torchrelay.services.{command[1]}.settings")
        settings_type = next(
            value
            for key, value in vars(settings_module).items()
            if key.endswith("Settings") and value.__module__ == settings_module.__name__
        )
        settings = settings_type()  # reads the compose environment; raises if it is invalid
        assert settings.nats.url == "nats://nats:4222"
        assert settings.http.host == "0.0.0.0"
