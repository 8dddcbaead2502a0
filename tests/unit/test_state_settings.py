"""The retention setting every service shares."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from torchrelay.shared.runtime.settings import ServiceSettings


def test_finished_records_are_kept_a_week_by_default() -> None:
    assert ServiceSettings().retention_s == 7 * 24 * 3600


def test_retention_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHRELAY_RETENTION_S", "3600")
    assert ServiceSettings().retention_s == 3600


def test_a_retention_under_a_minute_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHRELAY_RETENTION_S", "5")
    with pytest.raises(ValidationError, match="retention_s"):
        ServiceSettings()
