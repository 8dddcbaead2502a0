"""A TCP proxy in front of nats-server that makes a new watch's values reach the client late.

nats-server sends what a consumer pushes and what its API answers through different queues:
a request that reaches the server after a new consumer has sent everything it held can be
answered (that consumer: nothing pending) before those messages reach the client. Through this
proxy that is the rule, not a chance:

- each message a consumer pushes (a reply subject under ``$JS.``: values, flow control; or an
  idle heartbeat) is held ``delay_s`` and then passed on, in order, while every other message
  (request answers, publish acknowledgements, PING and PONG) passes at once;
- after the client subscribes to a plain subject (a consumer's inbox), what it sends next is
  held until the server has pushed that subject a value with nothing pending behind it, or
  ``hold_s`` has passed (a consumer with nothing to send, or no consumer at all);
- with ``lose``, the first that many values consumers push are lost on the way (a gap).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlparse

_CRLF = b"\r\n"
_WITH_PAYLOAD = (b"MSG", b"HMSG", b"PUB", b"HPUB")


@dataclass(frozen=True)
class _Frame:
    """One protocol frame: a line, or a (H)MSG/(H)PUB line and its payload."""

    raw: bytes
    args: list[bytes]
    payload: bytes

    @property
    def op(self) -> bytes:
        return self.args[0].upper() if self.args else b""

    @property
    def reply(self) -> bytes:
        """The reply subject of a MSG or HMSG (b"" when it has none)."""
        has_reply = len(self.args) == (5 if self.op == b"MSG" else 6)
        return self.args[3] if has_reply else b""

    @property
    def pushed(self) -> bool:
        """Whether a consumer pushed it: a value, a flow-control request or a heartbeat."""
        if self.op not in (b"MSG", b"HMSG"):
            return False
        return self.reply.startswith(b"$JS.") or self.payload.startswith(b"NATS/1.0 100")


def _pending(reply: bytes) -> int | None:
    """How many messages a consumer still held after pushing the one with this reply subject:
    $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<time>.<pending>, or since
    nats-server 2.10 $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.
    <time>.<pending>.<token>; None for anything else."""
    tokens = reply.split(b".")
    if tokens[:2] != [b"$JS", b"ACK"] or len(tokens) not in (9, 11, 12):
        return None
    return int(tokens[8] if len(tokens) == 9 else tokens[10])


def _take_frame(buffer: bytearray) -> _Frame | None:
    """Remove the first whole frame from ``buffer``; None while it is incomplete."""
    line_end = buffer.find(_CRLF)
    if line_end < 0:
        return None
    args = bytes(buffer[:line_end]).split()
    end = line_end + 2
    if args and args[0].upper() in _WITH_PAYLOAD:
        end += int(args[-1]) + 2
        if len(buffer) < end:
            return None
    frame = _Frame(bytes(buffer[:end]), args, bytes(buffer[line_end + 2 : end - 2]))
    del buffer[:end]
    return frame


async def _frames(reader: asyncio.StreamReader) -> AsyncIterator[_Frame]:
    buffer = bytearray()
    while chunk := await reader.read(65536):
        buffer += chunk
        while (frame := _take_frame(buffer)) is not None:
            yield frame


@dataclass
class _Losses:
    """How many more pushed values to lose, across the proxy's connections."""

    left: int


@dataclass
class _Link:
    """One client connection and its connection to the server."""

    delay_s: float
    hold_s: float
    losses: _Losses
    released: asyncio.Event = field(default_factory=asyncio.Event)
    awaited: bytes | None = None  # the subscription whose consumer must send all it holds

    async def from_client(self, client: asyncio.StreamReader, server: asyncio.StreamWriter) -> None:
        self.released.set()
        async for frame in _frames(client):
            try:
                await asyncio.wait_for(self.released.wait(), self.hold_s)
            except TimeoutError:
                self.released.set()
            server.write(frame.raw)
            # SUB <subject> [queue group] <sid>
            subject = frame.args[1] if len(frame.args) > 1 else b""
            if frame.op == b"SUB" and b"*" not in subject and b">" not in subject:
                self.awaited = frame.args[-1]
                self.released.clear()

    async def from_server(self, server: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        late: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        relay = asyncio.create_task(self._relay_late(late, client))
        try:
            async for frame in _frames(server):
                if not frame.pushed:
                    client.write(frame.raw)
                    continue
                if frame.reply.startswith(b"$JS.ACK.") and self.losses.left > 0:
                    self.losses.left -= 1
                else:
                    late.put_nowait((loop.time() + self.delay_s, frame.raw))
                # (H)MSG <subject> <sid> ...: a consumer keeps the stored message's subject
                if frame.args[2] == self.awaited and _pending(frame.reply) == 0:
                    self.released.set()
        finally:
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relay

    @staticmethod
    async def _relay_late(
        frames: asyncio.Queue[tuple[float, bytes]], client: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, raw = await frames.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            client.write(raw)


@contextlib.asynccontextmanager
async def late_deliveries(
    nats_url: str, *, delay_s: float, hold_s: float = 1.0, lose: int = 0
) -> AsyncIterator[str]:
    """A URL for a proxy to ``nats_url`` (see the module's doc); on exit its connections are
    closed."""
    upstream = urlparse(nats_url)
    losses = _Losses(lose)
    pumps: set[asyncio.Task[None]] = set()
    handlers: set[asyncio.Task[object]] = set()

    async def connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        if handler is not None:
            handlers.add(handler)
        up_reader, up_writer = await asyncio.open_connection(upstream.hostname, upstream.port)
        link = _Link(delay_s, hold_s, losses)
        both = {
            asyncio.create_task(link.from_client(reader, up_writer)),
            asyncio.create_task(link.from_server(up_reader, writer)),
        }
        pumps.update(both)
        try:
            await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in both:
                task.cancel()
            await asyncio.gather(*both, return_exceptions=True)
            pumps.difference_update(both)
            for stream in (writer, up_writer):
                stream.close()
                with contextlib.suppress(OSError):
                    await stream.wait_closed()

    proxy = await asyncio.start_server(connect, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    try:
        yield f"nats://127.0.0.1:{port}"
    finally:
        proxy.close()
        for task in list(pumps):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await proxy.wait_closed()
