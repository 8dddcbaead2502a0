"""The hot-path ack-subject parser agrees with nats-py's full metadata parser."""

from __future__ import annotations

import pytest
from nats.aio.msg import Msg

from torchrelay.shared.bus.jetstream import _delivery

REPLIES = [
    "$JS.ACK.TORCHRELAY.ingest-requests.3.1207.88.1795896105843849604.42",
    "$JS.ACK.hub.ACCHASH.TORCHRELAY.monitor-events.1.9.9.1795896105843849604.0.tok",
]


@pytest.mark.parametrize("reply", REPLIES)
def test_delivery_numbers_match_the_full_metadata(reply: str) -> None:
    msg = Msg(_client=None, subject="torchrelay.x", reply=reply, data=b"")  # type: ignore[arg-type]
    fast = _delivery(msg)
    full = msg.metadata
    assert fast.delivered == full.num_delivered
    assert fast.stream_sequence == full.sequence.stream
    assert fast.pending == full.num_pending
