"""Accepting on listening sockets: batches, errors, and a pause when out of resources.

Used by the gate (a single process, or the master draining its queue while closing) and by
each worker process.  Workers share one listening socket description; each registers it in
its own epoll set with EPOLLEXCLUSIVE, so one connection wakes one worker, not all.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from functools import partial

import structlog

from ..ops import supervise
from ..ops.metrics import accept_errors
from .poller import Poller

log = structlog.get_logger("forwarder.acceptor")

# an accepted peer: (host, port), or for IPv6 (host, port, flowinfo, scope_id)
Address = tuple[str, int] | tuple[str, int, int, int]
AcceptHandler = Callable[[socket.socket, Address], None]

# accept() errors that mean "out of resources now": back off instead of spinning
RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
BATCH = 64


class Acceptor:
    def __init__(self, name: str, socks: list[socket.socket], handler: AcceptHandler, *,
                 resource_pause: float = 1.0, exclusive: Poller | None = None,
                 on_not_listening: Callable[[], None] | None = None) -> None:
        self.name = name
        self.socks = socks
        self.handler = handler
        self.resource_pause = resource_pause
        self.exclusive = exclusive  # a Poller: register with EPOLLEXCLUSIVE there
        self.on_not_listening = on_not_listening
        self.loop = asyncio.get_running_loop()
        self.active = False  # asked to accept
        self._polling = False
        self._backoff: asyncio.TimerHandle | None = None

    def on(self) -> None:
        self.active = True
        if self._backoff is None:
            self._poll(True)

    def off(self) -> None:
        self.active = False
        self._poll(False)

    def close(self) -> None:
        self.off()
        if self._backoff is not None:
            self._backoff.cancel()
            self._backoff = None

    def drain(self) -> None:
        """Accept everything queued now, on every socket (a closing gate answers it)."""
        for s in self.socks:
            self.batch(s, None)

    def _poll(self, on: bool) -> None:
        if on == self._polling:
            return
        self._polling = on
        for s in self.socks:
            fd = s.fileno()
            if self.exclusive is not None:
                if on:
                    self.exclusive.add_reader(fd, partial(self.batch, s, BATCH),
                                              exclusive=True)
                else:
                    self.exclusive.remove_reader(fd)
            elif on:
                self.loop.add_reader(fd, self.batch, s, BATCH)
            else:
                self.loop.remove_reader(fd)

    def batch(self, sock: socket.socket, limit: int | None) -> None:
        # socket.accept() converts family/type to enums on every call; with the ints
        # cached the hot path builds the socket object directly
        fam, typ, proto = int(sock.family), int(sock.type), sock.proto
        raw_accept = sock._accept  # type: ignore[attr-defined]
        n = 0
        while limit is None or n < limit:
            try:
                fd, addr = raw_accept()
                conn = socket.socket(fam, typ, proto, fileno=fd)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in RESOURCE_ERRNOS:
                    self._exhausted(e)
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                if e.errno == errno.EINVAL:  # not listening (closed under us)
                    if self.on_not_listening is not None:
                        self.on_not_listening()
                else:
                    accept_errors.labels(self.name, errno.errorcode.get(e.errno or 0, "?")
                                         ).inc()
                return
            n += 1
            try:
                self.handler(conn, addr)
            except Exception:  # one connection's bug must not stop the accept loop
                supervise.internal_error("accept", "accept.handler_failed", listener=self.name)
                conn.close()

    def _exhausted(self, e: OSError) -> None:
        """Out of fds/buffers: stop polling for a moment instead of spinning.  The socket
        stays in LISTEN, so the kernel queues new clients meanwhile."""
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        accept_errors.labels(self.name, name).inc()
        if self._backoff is not None:
            return
        log.warning("gate.accept_paused", listener=self.name, error=name,
                    seconds=self.resource_pause)
        self._poll(False)

        def again() -> None:
            self._backoff = None
            if self.active:
                self._poll(True)
        self._backoff = self.loop.call_later(self.resource_pause, again)
