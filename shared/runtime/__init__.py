"""The service runtime: settings, logging, metrics, the HTTP side server and the lifecycle.

The names below are imported on first use: a process that needs only one light submodule
(a training rank configuring its logs with :mod:`~torchrelay.shared.runtime.logging`) does not
pay for the HTTP server, metrics and bus that a service's lifecycle needs (about a second of
CPU before a rank's first step).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torchrelay.shared.runtime.main import service_main
    from torchrelay.shared.runtime.service import Platform, Service, ServiceFactory, run_service
    from torchrelay.shared.runtime.settings import ServiceSettings

_HOMES = {
    "Platform": "service",
    "Service": "service",
    "ServiceFactory": "service",
    "run_service": "service",
    "service_main": "main",
    "ServiceSettings": "settings",
}

__all__ = [
    "Platform",
    "Service",
    "ServiceFactory",
    "ServiceSettings",
    "run_service",
    "service_main",
]


def __getattr__(name: str) -> Any:
    try:
        home = _HOMES[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
