"""The byte pump: two asyncio Protocols joined back to back.

Protocols, not Streams: no per-connection task in the data path and half the overhead.
Rules it keeps:
- Half-close: EOF from one side becomes write_eof() on the other; the other direction keeps
  flowing until its own EOF.  Both done -> both closed.
- Flow control: when one side's write buffer passes the high-water mark its transport calls
  pause_writing() on *its* protocol, which pauses reading on the opposite side.
- Errors are never hidden as a clean end: a reset on one side resets the other, so a
  truncated transfer is visible to the peer as a reset, not a FIN.
- Bytes arriving before the other side is ready (uvloop may deliver data before any
  pause takes effect; a backend greets before the client is wrapped) are held, not lost.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Any, cast

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
EARLY_LIMIT = 64 * 1024
_LINGER_RST = struct.pack("ii", 1, 0)


def reset(transport: asyncio.Transport) -> None:
    """Close with a RST: transport.abort() alone sends a FIN, which would make a cut-off
    transfer look complete to the peer."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass
    transport.abort()


class Side(asyncio.Protocol):
    """One socket of a splice."""

    __slots__ = ("early", "eof", "exc", "first_data", "gone", "nbytes", "peer", "splice",
                 "transport")

    def __init__(self, splice: Splice) -> None:
        self.splice = splice
        self.peer: Side | None = None
        self.transport: asyncio.Transport | None = None
        self.nbytes = 0
        self.eof = False
        self.early: list[bytes] | None = []
        self.first_data: asyncio.Future[bool] | None = None
        self.gone = False
        self.exc: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)

    def data_received(self, data: bytes) -> None:
        self.nbytes += len(data)
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
            return
        # the other side is not joined yet: hold the bytes, and stop reading if it grows
        assert self.early is not None
        self.early.append(data)
        if self.first_data is not None and not self.first_data.done():
            self.first_data.set_result(True)
        if sum(map(len, self.early)) > EARLY_LIMIT and self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        if self.first_data is not None and not self.first_data.done():
            self.first_data.set_result(False)
        peer = self.peer
        if peer is not None and peer.transport is not None:
            if not peer.transport.is_closing():
                peer.transport.write_eof()
            self.splice.check_done()
        return True  # keep our write side open: half-close

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.exc = exc
        if self.first_data is not None and not self.first_data.done():
            self.first_data.set_result(False)
        self.splice.lost(self, exc)

    def join(self, peer: Side) -> None:
        """Connect this side's output to `peer`; flush what was held meanwhile."""
        self.peer = peer
        early, self.early = self.early, None
        if early and peer.transport is not None:
            peer.transport.write(b"".join(early))
        if self.eof and peer.transport is not None:
            peer.transport.write_eof()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()


class Splice:
    """A client/backend pair; calls `on_done(splice, outcome)` exactly once."""

    __slots__ = ("backend", "client", "done", "on_done", "outcome", "started", "tag")

    def __init__(self, on_done: Callable[[Splice, str], None], tag: Any = None) -> None:
        self.client = Side(self)
        self.backend = Side(self)
        self.on_done = on_done
        self.done = False
        self.outcome = "spliced"
        self.started = 0.0
        self.tag = tag

    def join(self) -> None:
        self.client.join(self.backend)
        self.backend.join(self.client)
        for side in (self.backend, self.client):
            if side.gone:  # lost before the join: replay it now that both sides exist
                self.lost(side, side.exc)
                return
        self.check_done()

    def check_done(self) -> None:
        if self.client.eof and self.backend.eof and self.client.peer is not None:
            self.close()

    def close(self) -> None:
        for s in (self.client, self.backend):
            if s.transport is not None:
                s.transport.close()  # flushes what is buffered, then closes

    def abort(self, outcome: str) -> None:
        self.outcome = outcome
        for s in (self.client, self.backend):
            if s.transport is not None:
                reset(s.transport)

    def lost(self, side: Side, exc: Exception | None) -> None:
        if self.client.peer is None:
            return  # not joined: the listener still owns this attempt
        other = self.backend if side is self.client else self.client
        if exc is not None:
            if self.outcome == "spliced":
                self.outcome = "error"
            if other.transport is not None:
                reset(other.transport)  # make the truncation visible: RST, not FIN
        elif other.transport is not None and not other.transport.is_closing():
            other.transport.close()
        if not self.done and (other.transport is None or other.transport.is_closing()):
            self.done = True
            self.on_done(self, self.outcome)

    @property
    def nbytes(self) -> int:
        return self.client.nbytes + self.backend.nbytes

    @property
    def bytes_up(self) -> int:
        return self.client.nbytes

    @property
    def bytes_down(self) -> int:
        return self.backend.nbytes
