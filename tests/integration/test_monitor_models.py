"""The monitor's view of what serves: `torchrelay_model_active_version` follows model.deployed
and model.undeployed, so a model taken down no longer shows as serving."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from torchrelay.services.monitor.handlers import EventMetrics, Monitor
from torchrelay.services.monitor.settings import MonitorOptions
from torchrelay.shared.events import AnyEvent, ModelDeployed, ModelUndeployed
from torchrelay.shared.events.data import ModelDeployedData, ModelUndeployedData
from torchrelay.shared.runtime.metrics import reconciled_counter
from torchrelay.shared.state import MemoryState

pytestmark = pytest.mark.timeout(60)
ENDPOINT = "http://127.0.0.1:9000/v2/models/digits"


async def _ignore(_: AnyEvent) -> bool:
    return True


def _monitor(registry: CollectorRegistry) -> Monitor:
    return Monitor(
        metrics=EventMetrics(registry),
        state=MemoryState(),
        publish=_ignore,
        options=MonitorOptions(),
        source="/tests",
        instance="tests",
        reconciled=reconciled_counter(CollectorRegistry()),
    )


def _active(registry: CollectorRegistry, version: str) -> float | None:
    labels = {"model": "digits", "version": version}
    return registry.get_sample_value("torchrelay_model_active_version", labels)


def _deployed(version: str) -> ModelDeployed:
    return ModelDeployed(
        source="/torchrelay/serve",
        data=ModelDeployedData(model_name="digits", version=version, endpoint=ENDPOINT),
    )


def _undeployed(version: str) -> ModelUndeployed:
    return ModelUndeployed(
        source="/torchrelay/serve",
        data=ModelUndeployedData(
            model_name="digits", version=version, endpoint=ENDPOINT, reason="retired"
        ),
    )


async def test_an_undeployed_model_no_longer_shows_a_serving_version() -> None:
    registry = CollectorRegistry()
    monitor = _monitor(registry)
    await monitor.on_event(_deployed("v1"))
    await monitor.on_event(_deployed("v2"))
    assert (_active(registry, "v1"), _active(registry, "v2")) == (0.0, 1.0)

    undeployed = _undeployed("v2")
    await monitor.on_event(undeployed)
    assert (_active(registry, "v1"), _active(registry, "v2")) == (0.0, 0.0)
    await monitor.on_event(undeployed)  # a redelivery
    assert _active(registry, "v2") == 0.0

    await monitor.on_event(_deployed("v2"))  # deployed again
    assert _active(registry, "v2") == 1.0


async def test_an_undeploy_seen_by_a_replica_that_missed_the_deploy_clears_its_version() -> None:
    registry = CollectorRegistry()
    await _monitor(registry).on_event(_undeployed("v3"))
    assert _active(registry, "v3") == 0.0
