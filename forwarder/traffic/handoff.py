"""The hand-off from an accepted client to a backend on the os.splice path, driven by
callbacks: connect, (smtp mode) wait for the greeting, then a PipeSplice.

Why not a coroutine: at thousands of sessions a second, a Task per connection (creation,
and a wake-up through call_soon after every await) was a measurable share of the cost of a
short session; here the poller calls straight into the next step.  The rules are those of
`Listener._serve`: the best live backend first, the next one when a connect fails or a
backend stays silent or closes before its first byte (nothing has reached the client yet),
and a 421 (smtp) or a close (tcp) only when none is left.
"""

from __future__ import annotations

import errno
import math
import os
import socket
import struct
import time
from typing import TYPE_CHECKING

from ..net import proxy_protocol
from ..ops.system import tune
from .splice import COPY_MAX, PipeSplice

if TYPE_CHECKING:
    from ..health.backends import Backend
    from .gate import Address
    from .listener import Listener

_LINGER_RST = struct.pack("ii", 1, 0)
# what a read reports when the connect itself failed (refused, no route, SYNs unanswered)
_CONNECT_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                             errno.ETIMEDOUT, errno.EHOSTDOWN, errno.ENETDOWN})


class Handoff:
    __slots__ = ("addr", "backend", "bs", "conn", "deadline", "lst", "step", "t0", "todo",
                 "tried")

    def __init__(self, lst: Listener, conn: socket.socket, addr: Address,
                 candidates: list[Backend]) -> None:
        self.lst = lst
        self.conn = conn
        self.addr = addr
        self.todo = candidates
        self.tried = 0
        self.backend: Backend | None = None
        self.bs: socket.socket | None = None
        # checked by the listener's watchdog (Listener.watch), not a timer per connection:
        # a TimerHandle created and cancelled twice per session was ~3% of the churn cost
        self.deadline = math.inf
        self.step = ""  # what the deadline is for: connect, greeting, or direct (both)
        self.t0 = 0.0

    def start(self) -> None:
        self.lst.watch(self)
        self._next()

    def expire(self) -> None:
        """Called by the listener's watchdog once `deadline` has passed."""
        self.deadline = math.inf
        if self.step == "direct":
            self._deadline()
        else:
            self._expired(self.step)

    # --- steps ----------------------------------------------------------------------------

    def _next(self) -> None:
        while self.todo:
            b = self.todo.pop(0)
            self.tried += 1
            if self._connect(b):
                return  # waiting for the poller
        self.lst.handoffs.discard(self)
        self.lst.refuse_later(self.conn, self.addr,
                              "backend_failed_421" if self.tried else "no_backend_421")

    def _connect(self, b: Backend) -> bool:
        sa = b.sockaddr
        assert sa is not None
        try:  # non-blocking from birth: no ioctl
            bs = socket.socket(sa[0], socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as e:  # out of fds: this backend is fine, we are not
            b.passive_failure("connect", e.strerror or str(e))
            return False
        tune(bs, self.lst.cfg)
        err = bs.connect_ex(sa[1])
        if err and err != errno.EINPROGRESS:
            bs.close()
            b.passive_failure("connect", os.strerror(err))
            return False
        lst = self.lst
        cfg = lst.cfg
        self.backend, self.bs, self.t0 = b, bs, lst.loop.time()
        if cfg.mode == "smtp" and not cfg.send_proxy:
            # The greeting proves the connect: wait for it straight away.  No writable
            # wait, no SO_ERROR read, one epoll_ctl and one wake-up fewer per session; a
            # refused connect shows up as an error on the first read (see _greeted).
            self.deadline = self.t0 + min(cfg.connect_timeout, cfg.greeting_timeout)
            self.step = "direct"
            lst.poller.add_reader(bs.fileno(), self._greeted)
            return True
        self.deadline, self.step = self.t0 + cfg.connect_timeout, "connect"
        lst.poller.add_writer(bs.fileno(), self._connected)
        return True

    def _deadline(self) -> None:
        """One deadline for both limits of the direct-to-greeting path, both counted from the
        start of the connect: not connected by `connect_timeout` is a connect failure,
        connected but silent at `greeting_timeout` a greeting failure."""
        bs, lst = self.bs, self.lst
        assert bs is not None
        try:
            bs.getpeername()
            step, limit = "greeting", lst.cfg.greeting_timeout
        except OSError:  # ENOTCONN: the handshake has not completed
            step, limit = "connect", lst.cfg.connect_timeout
        left = limit - (lst.loop.time() - self.t0)
        if left > 0.001:  # the first deadline was the smaller limit: wait for the other
            self.deadline = lst.loop.time() + left
        else:
            self._expired(step)

    def _connected(self) -> None:
        bs, b, lst = self.bs, self.backend, self.lst
        assert bs is not None and b is not None
        err = bs.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._failed("connect", os.strerror(err))
            return
        self.deadline = math.inf
        b.metrics.connect.observe(lst.loop.time() - self.t0)
        fd = bs.fileno()
        cfg = lst.cfg
        try:
            if cfg.send_proxy:
                bs.send(proxy_protocol.header_for_socket(cfg.send_proxy, self.conn))
        except OSError as e:
            self._failed("connect", e.strerror or str(e))
            return
        if cfg.mode == "smtp":
            # one epoll_ctl: the registration turns from "writable" to "readable"
            lst.poller.swap_to_reader(fd, self._greeted)
            self.deadline, self.step = lst.loop.time() + cfg.greeting_timeout, "greeting"
            return
        lst.poller.drop_writer(fd)  # PipeSplice.start re-arms the fd: one epoll_ctl
        self._splice()

    def _greeted(self) -> None:
        """The greeting is read here and passed to the client before the splice starts: a
        backend that resets right after greeting would otherwise destroy the unread
        greeting in our receive queue, and the client would see a reset before any reply
        (the no-silent-drop rule wants a 421 or a next backend then)."""
        bs, b = self.bs, self.backend
        assert bs is not None and b is not None
        try:
            greeting = bs.recv(COPY_MAX)
        except (BlockingIOError, InterruptedError):
            return  # spurious: keep waiting
        except OSError as e:
            if e.errno in _CONNECT_ERRNOS:  # the direct-to-greeting path's failed connect
                self._failed("connect", e.strerror or str(e))
                return
            greeting = b""
        if not greeting:
            self._failed("greeting", "closed or reset before a greeting")
            return
        self.deadline = math.inf
        if self.step == "direct":  # the connect is not timed apart from the greeting
            b.metrics.connect.observe(self.lst.loop.time() - self.t0)
        self.lst.poller.drop_reader(bs.fileno())  # re-armed as it is by PipeSplice.start
        self._splice(greeting)

    def _expired(self, step: str) -> None:
        self._failed(step, "timeout" if step == "connect" else "no greeting before timeout")

    def _failed(self, step: str, detail: str) -> None:
        bs, b = self.bs, self.backend
        assert bs is not None and b is not None
        self.deadline = math.inf
        self.lst.poller.forget(bs.fileno())  # closing the socket removes it from epoll
        if step == "greeting":
            bs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        bs.close()
        self.bs = None
        b.passive_failure(step, detail)
        self._next()

    def _splice(self, greeting: bytes = b"") -> None:
        lst, bs, b = self.lst, self.bs, self.backend
        assert bs is not None and b is not None
        lst.handoffs.discard(self)
        sp = PipeSplice(lst.loop, self.conn, bs, lst._finished, (self.addr, b))
        sp.started = time.monotonic()
        lst.splices.add(sp)
        lst.metrics.active.inc()
        sp.start(greeting)

    def abort(self) -> None:
        """At shutdown, or when no splice could be set up: both sockets closed."""
        self.lst.handoffs.discard(self)
        self.deadline = math.inf
        if self.bs is not None:
            self.lst.poller.forget(self.bs.fileno())
            self.bs.close()
            self.bs = None
        self.conn.close()
        self.lst.release(self.addr)
