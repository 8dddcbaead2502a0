"""Settings: environment, flags, and errors that name the field to fix."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from torchrelay.services.monitor.settings import MonitorSettings
from torchrelay.shared.bus.connection import NatsSettings
from torchrelay.shared.runtime.main import _parser, describe_settings_error, overrides_from_flags
from torchrelay.shared.runtime.settings import ServiceSettings, ShutdownSettings


def test_environment_variables_fill_nested_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHRELAY_NATS_URL", "nats://nats:4222")
    monkeypatch.setenv("TORCHRELAY_NATS_CREDS_FILE", "/etc/nats/app.creds")
    monkeypatch.setenv("TORCHRELAY_STORAGE_ROOT", "/mnt/nfs")
    monkeypatch.setenv("TORCHRELAY_HTTP_BEARER_TOKEN", "s3cret")
    monkeypatch.setenv("TORCHRELAY_SHUTDOWN_GRACE_S", "5")
    settings = ServiceSettings()
    assert settings.nats.url == "nats://nats:4222"
    assert str(settings.nats.creds_file) == "/etc/nats/app.creds"
    assert str(settings.storage_root) == "/mnt/nfs"
    assert settings.http.bearer_token is not None
    assert settings.http.bearer_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings), "secrets never print"
    assert settings.shutdown.grace_s == 5


def test_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHRELAY_NATS_URL", "nats://from-env:4222")
    monkeypatch.setenv("TORCHRELAY_HTTP_HOST", "0.0.0.0")
    args = _parser("monitor").parse_args(["--nats-url", "nats://flag:1", "--http-port", "9000"])
    settings = MonitorSettings(**overrides_from_flags(args))
    assert settings.nats.url == "nats://flag:1"
    assert settings.http.port == 9000
    assert settings.http.host == "0.0.0.0"


def test_each_service_has_its_own_default_port() -> None:
    assert MonitorSettings().http.port == 8084
    assert ServiceSettings().http.host == "127.0.0.1", "HTTP binds loopback unless told"


def test_bad_settings_list_every_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHRELAY_HTTP_PORT", "99999")
    monkeypatch.setenv("TORCHRELAY_LOG_LEVEL", "loud")
    with pytest.raises(ValidationError) as info:
        ServiceSettings()
    text = describe_settings_error(info.value)
    assert "TORCHRELAY_HTTP_PORT" in text
    assert "TORCHRELAY_LOG_LEVEL" in text


def test_grace_must_be_shorter_than_the_deadline() -> None:
    with pytest.raises(ValidationError, match="grace_s"):
        ShutdownSettings(grace_s=30, deadline_s=10)


def test_one_nats_auth_method_at_a_time() -> None:
    with pytest.raises(ValidationError, match="choose one NATS auth method"):
        NatsSettings(token="t", creds_file="/x.creds")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="user and password go together"):
        NatsSettings(user="u")
    assert NatsSettings(user="u", password="p").user == "u"  # type: ignore[arg-type]
