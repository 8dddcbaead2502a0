"""Handlers log with the event's ids bound, and without leaking them afterwards."""

from __future__ import annotations

import structlog
from structlog.testing import capture_logs

from tests.factories import staged
from torchrelay.shared.bus.memory import MemoryBus
from torchrelay.shared.bus.port import Subscription
from torchrelay.shared.events import AnyEvent, DatasetStaged


async def test_log_lines_in_a_handler_carry_event_pipeline_and_consumer() -> None:
    bus = MemoryBus()
    log = structlog.get_logger()

    async def handle(event: AnyEvent) -> None:
        log.info("handling", note="inside")

    sub = Subscription("ctx", [DatasetStaged], handle)
    await bus.provision([sub])
    event = staged(pipelineid="pipe-3")
    await bus.publish(event)
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        await bus.run_until_idle(sub)
        log.info("after")
    inside = next(entry for entry in logs if entry["event"] == "handling")
    assert inside["event_id"] == event.id
    assert inside["pipeline_id"] == "pipe-3"
    assert inside["event_type"] == "io.torchrelay.dataset.staged.v1"
    assert inside["consumer"] == "ctx"
    after = next(entry for entry in logs if entry["event"] == "after")
    assert "event_id" not in after
    assert "consumer" not in after
