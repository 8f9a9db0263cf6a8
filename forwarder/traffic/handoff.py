"""The hand-off: from an accepted client to a connected (smtp mode: greeted) backend socket.

The one place of the rule "connect to the best live backend, send the PROXY header, in
smtp mode wait for its first byte within the greeting deadline; on failure count a passive
failure and try the next live backend; only when none is left, refuse (421 in smtp mode,
a close in tcp mode)".  Nothing has reached the client before the hand-off ends, so trying
the next backend is always safe.  The outcome goes to a Sink (the listener): `ready(h,
greeting)` with `h.backend` and `h.bs` set, or `refused(h, outcome)`; after either the
hand-off never touches its sockets again (tcpproxy's contract for its Target).

Callbacks, not a coroutine: at thousands of sessions a second a Task per connection (its
creation, a call_soon wake-up after every await) was a measurable share of a short
session's cost.  The Poller calls straight into the next step, and every deadline lives in
the listener's Deadlines (one timer for all, exact to the loop's clock); the greeting
deadline is the backend's own (health/greeting.py: learned from its probes, or fixed).  Dialing is a
function in the Plan, so a test can hand the hand-off any socket it likes.

In smtp mode without PROXY the greeting proves the connect: we wait for it right after
connect() (no writable wait, no SO_ERROR read: one epoll_ctl and one wake-up fewer per
session).  One deadline then covers both limits: at min(connect_timeout,
greeting_timeout) from the start, an unfinished handshake is a connect failure and a
silent connected backend gets the rest of its greeting time (see `_direct_expired`).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Sequence
from typing import Protocol

from ..config.model import SockAddr
from ..net import proxy_protocol
from ..net.sockets import reset
from .acceptor import Address
from .deadlines import Deadlines
from .poller import Poller
from .splice import COPY_MAX


class Observer(Protocol):
    def observe(self, value: float) -> None: ...


class Deadline(Protocol):
    @property
    def seconds(self) -> float: ...


class Candidate(Protocol):
    """What the hand-off needs of a backend (health.backends.Backend in the master, a
    replica in a worker process)."""

    @property
    def name(self) -> str: ...

    @property
    def sockaddr(self) -> SockAddr: ...

    @property
    def greeting(self) -> Deadline: ...

    @property
    def connect(self) -> Observer: ...  # time until a connection was usable

    def passive_failure(self, reason: str, detail: str = "") -> None: ...


Dialer = Callable[[Candidate], socket.socket]

# what a read reports when the connect itself failed (refused, no route, SYNs unanswered)
CONNECT_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                            errno.ETIMEDOUT, errno.EHOSTDOWN, errno.ENETDOWN})
# socket() failures that are ours (out of fds or memory), not the backend's
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Sink(Protocol):
    """Where a hand-off's outcome goes (the listener owns the connection from then on)."""

    def ready(self, h: Handoff, greeting: bytes) -> None: ...

    def refused(self, h: Handoff, outcome: str) -> None: ...


def dial(b: Candidate, options: Callable[[socket.socket], None]) -> socket.socket:
    """A non-blocking socket with its connect to `b` under way (or failed: OSError)."""
    family, sockaddr = b.sockaddr
    bs = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)  # no ioctl
    try:
        options(bs)
        err = bs.connect_ex(sockaddr)
    except OSError:
        bs.close()
        raise
    if err and err != errno.EINPROGRESS:
        bs.close()
        raise OSError(err, os.strerror(err))
    return bs


def _established(bs: socket.socket) -> bool:
    """Has the handshake completed?  A backend on loopback has finished it by the time
    connect() returns (the SYN-ACK is processed before the socket lock is released), so
    the writable-wait (two epoll_ctl and a wake-up per connection) is skipped; elsewhere
    this costs one getpeername (ENOTCONN) per connection."""
    try:
        bs.getpeername()
    except OSError:
        return False
    return True


class Plan:
    """How one listener hands off, rebuilt when its config changes (a hand-off in progress
    keeps the plan it started with)."""

    __slots__ = ("connect_timeout", "deadlines", "dial", "poller", "proxy", "sink", "smtp",
                 "time")

    def __init__(self, *, sink: Sink, poller: Poller, deadlines: Deadlines, dial: Dialer,
                 smtp: bool, proxy: str | None, connect_timeout: float) -> None:
        self.sink, self.poller, self.deadlines, self.dial = sink, poller, deadlines, dial
        self.time = poller.loop.time
        self.smtp, self.proxy = smtp, proxy
        self.connect_timeout = connect_timeout


class Handoff:
    __slots__ = ("addr", "backend", "bs", "conn", "plan", "released", "step", "t0", "tag",
                 "todo", "token", "tried")

    def __init__(self, plan: Plan, conn: socket.socket, addr: Address,
                 candidates: Sequence[Candidate]) -> None:
        self.plan = plan
        self.conn = conn
        self.addr = addr
        self.todo = candidates
        self.tried = 0
        self.backend: Candidate | None = None
        self.bs: socket.socket | None = None
        self.step = ""  # what the deadline is for: connect, greeting, or direct (both)
        self.t0 = 0.0
        self.token = 0  # Deadlines' bookkeeping
        self.tag: object = None  # the sink's own record of this connection
        self.released = False

    @property
    def waiting(self) -> bool:
        return self.bs is not None

    def start(self) -> None:
        self._next()

    # --- steps ----------------------------------------------------------------------------

    def _next(self) -> None:
        plan = self.plan
        while self.tried < len(self.todo):
            b = self.todo[self.tried]
            self.tried += 1
            try:
                bs = plan.dial(b)
            except OSError as e:
                if e.errno in LOCAL_ERRNOS:  # the backend is fine, we are out of fds
                    break
                b.passive_failure("connect", e.strerror or str(e))
                continue
            self._wait(b, bs)
            return
        plan.sink.refused(self, "backend_failed_421" if self.tried else "no_backend_421")

    def _wait(self, b: Candidate, bs: socket.socket) -> None:
        plan = self.plan
        now = plan.time()
        self.backend, self.bs, self.t0 = b, bs, now
        if plan.smtp and not plan.proxy:
            self.step = "direct"
            plan.deadlines.set(self, now + min(plan.connect_timeout, b.greeting.seconds))
            plan.poller.add_reader(bs.fileno(), self._greeted)
        else:
            self.step = "connect"
            if _established(bs):
                self._connected()
                return
            plan.deadlines.set(self, now + plan.connect_timeout)
            plan.poller.add_writer(bs.fileno(), self._connected)

    def _connected(self) -> None:
        bs, b, plan = self.bs, self.backend, self.plan
        assert bs is not None and b is not None
        err = bs.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._failed("connect", os.strerror(err))
            return
        b.connect.observe(plan.time() - self.t0)
        if plan.proxy:
            try:
                bs.send(proxy_protocol.header_for_socket(plan.proxy, self.conn))
            except OSError as e:
                self._failed("connect", e.strerror or str(e))
                return
        fd = bs.fileno()
        if plan.smtp:
            self.step = "greeting"
            plan.deadlines.set(self, plan.time() + b.greeting.seconds)
            plan.poller.swap_to_reader(fd, self._greeted)  # one epoll_ctl
            return
        plan.deadlines.clear(self)
        plan.poller.drop_writer(fd)  # the splice re-arms the fd: one epoll_ctl
        plan.sink.ready(self, b"")

    def _greeted(self) -> None:
        """The greeting is read here and passed on before the splice starts: a backend that
        resets right after greeting would otherwise destroy the unread greeting in our
        receive queue, and the client would see a reset before any reply."""
        bs, b, plan = self.bs, self.backend, self.plan
        assert bs is not None and b is not None
        try:
            greeting = bs.recv(COPY_MAX)
        except (BlockingIOError, InterruptedError):
            return  # spurious: keep waiting
        except OSError as e:
            if e.errno in CONNECT_ERRNOS:  # the direct path's failed connect
                self._failed("connect", e.strerror or str(e))
                return
            greeting = b""
        if not greeting:
            self._failed("greeting", "closed or reset before a greeting")
            return
        plan.deadlines.clear(self)
        if self.step == "direct":  # the connect is not timed apart from the greeting
            b.connect.observe(plan.time() - self.t0)
        plan.poller.drop_reader(bs.fileno())  # re-armed as it is by the splice
        plan.sink.ready(self, greeting)

    def expire(self) -> None:
        """Deadlines calls this once the step's deadline has passed."""
        if self.step == "direct":
            self._direct_expired()
        elif self.step == "connect":
            self._failed("connect", "timeout")
        else:
            self._failed("greeting", "no greeting before timeout")

    def _direct_expired(self) -> None:
        """Both limits of the direct path count from the start of the connect: not
        connected by connect_timeout is a connect failure, connected but silent at
        greeting_timeout a greeting failure.  The first deadline was the smaller one."""
        bs, b, plan = self.bs, self.backend, self.plan
        assert bs is not None and b is not None
        if _established(bs):
            step, limit = "greeting", b.greeting.seconds
        else:
            step, limit = "connect", plan.connect_timeout
        now = plan.time()
        if self.t0 + limit > now + 0.001:
            plan.deadlines.set(self, self.t0 + limit)
        else:
            self._failed(step, "timeout" if step == "connect" else
                         "no greeting before timeout")

    def release(self, reason: str) -> None:
        """The backend we wait for was declared down: move on now instead of waiting out
        the deadline (not a passive failure of its own: the verdict is already in)."""
        if self.bs is None:
            return
        self.released = True
        self._drop_attempt()
        self._next()

    def _failed(self, step: str, detail: str) -> None:
        b = self.backend
        assert b is not None
        self._drop_attempt()
        b.passive_failure(step, detail)
        self._next()

    def _drop_attempt(self) -> None:
        bs = self.bs
        assert bs is not None
        self.plan.deadlines.clear(self)
        self.plan.poller.forget(bs.fileno())  # closing removes it from the epoll set
        reset(bs)
        self.bs = None

    def abort(self) -> None:
        """Shutting down: both sockets closed with a reset; the sink is not called."""
        if self.bs is not None:
            self._drop_attempt()
        reset(self.conn)
