"""Messages between the forwarder's own processes (master, fork server, workers).

A SOCK_SEQPACKET socketpair keeps message boundaries and carries file descriptors
(SCM_RIGHTS), so a message is one packet: a pickled (kind, payload) tuple plus any fds.
Pickle is safe here because both ends are this program, forked from one process; nothing
from the network is ever unpickled.  The sender never blocks the event loop: a full
socket queues the message and waits for the socket to drain.
"""

from __future__ import annotations

import array
import asyncio
import pickle
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

MAX_MESSAGE = 1 << 22
BUFFER = 1 << 23
MAX_FDS = 64

Handler = Callable[[str, Any, list[int]], None]


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
    return a, b


def encode(kind: str, payload: Any) -> bytes:
    data = pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"message {kind} is {len(data)} bytes (max {MAX_MESSAGE})")
    return data


def decode(data: bytes, ancdata: list[tuple[int, int, bytes]]) -> tuple[str, Any, list[int]]:
    fds: list[int] = []
    for level, kind, blob in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(blob[: len(blob) - len(blob) % arr.itemsize])
            fds.extend(arr)
    kind, payload = pickle.loads(data)
    return str(kind), payload, fds


def send_blocking(sock: socket.socket, kind: str, payload: Any,
                  fds: Sequence[int] = ()) -> None:
    """For the fork server, which has no event loop."""
    socket.send_fds(sock, [encode(kind, payload)], list(fds))


def recv_blocking(sock: socket.socket) -> tuple[str, Any, list[int]] | None:
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if not data:
        return None
    kind, payload = pickle.loads(data)
    return str(kind), payload, list(fds)


class Channel:
    """One end of a pair, on an event loop: `send()` never blocks; `handler` gets every
    message; `closed` is called once when the other end is gone."""

    def __init__(self, sock: socket.socket, handler: Handler,
                 closed: Callable[[], None]) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.loop = asyncio.get_running_loop()
        self.handler = handler
        self.closed = closed
        self.queue: deque[tuple[bytes, list[int]]] = deque()
        self.is_closed = False
        self.loop.add_reader(sock.fileno(), self._readable)

    def send(self, kind: str, payload: Any = None, fds: Sequence[int] = ()) -> None:
        if self.is_closed:
            return
        self.queue.append((encode(kind, payload), list(fds)))
        if len(self.queue) == 1:
            self._flush()

    def _flush(self) -> None:
        while self.queue:
            data, fds = self.queue[0]
            try:
                socket.send_fds(self.sock, [data], fds) if fds else self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                self.loop.add_writer(self.sock.fileno(), self._writable)
                return
            except OSError:
                self._gone()
                return
            self.queue.popleft()

    def _writable(self) -> None:
        self.loop.remove_writer(self.sock.fileno())
        self._flush()

    def _readable(self) -> None:
        while not self.is_closed:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(
                    MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._gone()
                return
            if not data:
                self._gone()
                return
            self.handler(*decode(data, ancdata))

    def read_pending(self) -> None:
        """Handle what has arrived and not been read yet (before closing on news from
        elsewhere that the peer is gone: its last messages still count)."""
        self._readable()

    def _gone(self) -> None:
        if self.is_closed:
            return
        self.close()
        self.closed()

    def close(self) -> None:
        if not self.is_closed:
            self.is_closed = True
            self.loop.remove_reader(self.sock.fileno())
            self.loop.remove_writer(self.sock.fileno())
            self.sock.close()
