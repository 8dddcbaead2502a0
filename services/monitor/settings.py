"""Settings of the monitor service (``TORCHRELAY_*``, see the shared runtime settings)."""

from __future__ import annotations

from torchrelay.shared.runtime.settings import HttpSettings, ServiceSettings

DEFAULT_PORT = 8084


class MonitorSettings(ServiceSettings):
    """The monitor needs only the common settings; its HTTP port defaults to 8084."""

    http: HttpSettings = HttpSettings(port=DEFAULT_PORT)
