"""Settings of the monitor service: ``TORCHRELAY_MONITOR_<FIELD>`` plus the common ones."""

from __future__ import annotations

from pydantic import Field

from torchrelay.shared.runtime.settings import Group, HttpSettings, ServiceSettings

DEFAULT_PORT = 8084


class MonitorOptions(Group):
    stall_after_s: float = Field(
        default=120.0,
        gt=0,
        description="A running attempt silent this long after a progress report is stalled "
        "(the clock starts at its first report, sent once every rank has joined).",
    )
    start_timeout_s: float = Field(
        default=3600.0,
        gt=0,
        description="An attempt with no progress report this long after its start is stalled "
        "(ranks never starting, or hanging before their first step). Above the backends' own "
        "bounds on a start (Kubernetes' pending timeout plus the rendezvous timeout), so that "
        "a backend that can say why reports it first.",
    )
    stall_check_s: float = Field(default=5.0, gt=0, description="How often stalls are looked for.")
    progress_record_s: float = Field(
        default=5.0,
        gt=0,
        description="A run's last progress is written to the monitor's state at most this "
        "often (the reports between are metrics only), so a stall is called at most this much "
        "late, never early (at most a quarter of stall_after_s is used).",
    )
    backoff_base_s: float = Field(
        default=2.0,
        ge=0,
        description="First restart's delay, doubling for each later one; an attempt that "
        "reported progress before it failed is restarted at once.",
    )
    backoff_cap_s: float = Field(default=60.0, ge=0, description="Longest restart delay.")
    reconcile_grace_s: float = Field(
        default=30.0,
        gt=0,
        description="How long a run may sit in a state that an event on its way should move "
        "before reconciliation moves it on itself (a missed start, an overdue restart).",
    )

    @property
    def progress_every_s(self) -> float:
        """How often progress is written: ``progress_record_s``, at most a quarter of
        ``stall_after_s`` so that a run that reports never looks stalled."""
        return min(self.progress_record_s, self.stall_after_s / 4)


class MonitorSettings(ServiceSettings):
    """Metrics for the whole pipeline and recovery of failed or stalled runs."""

    http: HttpSettings = HttpSettings(port=DEFAULT_PORT)
    monitor: MonitorOptions = MonitorOptions()
