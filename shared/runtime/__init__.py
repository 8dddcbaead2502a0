"""The service runtime: settings, logging, metrics, the HTTP side server and the lifecycle."""

from torchrelay.shared.runtime.main import service_main
from torchrelay.shared.runtime.service import Platform, Service, ServiceFactory, run_service
from torchrelay.shared.runtime.settings import ServiceSettings

__all__ = [
    "Platform",
    "Service",
    "ServiceFactory",
    "ServiceSettings",
    "run_service",
    "service_main",
]
