"""The gate: bound sockets that listen only while the listener should take connections.

Closed means bound but not listening, so a SYN gets a RST (connection refused) and the
sender moves on to its next MX in milliseconds.  We never close or re-bind the socket:
after the privilege drop a re-bind of port 25 would fail.  Linux lets a listening socket be
taken out of LISTEN with shutdown(SHUT_RD) and put back with listen(), no privilege needed
(HAProxy pauses listeners the same way).  This relies on the port having been bound
explicitly (SOCK_BINDPORT_LOCK): a socket bound to port 0 loses its port on shutdown and
listen() would pick a new ephemeral one, so ports are always explicit here.

Before leaving LISTEN the accept queue is drained: those clients completed their handshake
and would otherwise be reset; they are handed to the listener, which gives each the best
answer left (a live peer, or a 421).  Draining alone leaves a race: a handshake completing
between the last accept() and shutdown() lands in the queue and is reset with it (the 1,000
flap test hit it about once per thousand flaps).  So closing first attaches a socket filter
that drops new SYNs, keeps accepting for CLOSE_SETTLE seconds while handshakes already in
flight complete, then drains once more, leaves LISTEN and removes the filter.  A SYN
dropped meanwhile is retransmitted by its client after a second and then refused.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import socket
import struct
from collections.abc import Callable

import structlog

from ..net.sockets import relisten, unlisten
from ..ops.metrics import ListenerMetrics, accept_errors

log = structlog.get_logger("forwarder.gate")

Address = tuple[str, int]
AcceptHandler = Callable[[socket.socket, Address], None]

# accept() errors that mean "out of resources now": back off instead of spinning
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
ACCEPT_BATCH = 64
CLOSE_SETTLE = 0.1  # seconds a closing gate still accepts in-flight handshakes

_SO_ATTACH_FILTER, _SO_DETACH_FILTER = 26, 27


def _bpf(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


# classic BPF on the TCP header: drop a segment whose flags have SYN set and ACK clear
_DROP_SYN = ctypes.create_string_buffer(b"".join([
    _bpf(0x30, 13),                # ldb [13]        (TCP flags)
    _bpf(0x54, 0x12),              # and #SYN|ACK
    _bpf(0x15, 0x02, jt=0, jf=1),  # jeq #SYN ? drop : accept
    _bpf(0x06, 0),                 # ret #0          drop
    _bpf(0x06, 0xFFFFFFFF),        # ret #-1         accept
]), 40)
_DROP_SYN_PROG = struct.pack("HL", 5, ctypes.addressof(_DROP_SYN))


_filter_warned = False


def _drop_syns(sock: socket.socket, on: bool) -> bool:
    global _filter_warned
    try:
        if on:
            sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, _DROP_SYN_PROG)
        else:
            sock.setsockopt(socket.SOL_SOCKET, _SO_DETACH_FILTER, 0)
        return True
    except OSError as e:
        if on and not _filter_warned:  # some kernels want CAP_NET_ADMIN for this
            _filter_warned = True
            log.warning("gate.syn_filter_unavailable", error=e.strerror,
                        detail="closing falls back to drain-then-shutdown: a handshake "
                               "completing in that instant is reset")
        return False


class Gate:
    def __init__(self, name: str, socks: list[socket.socket], backlog: int,
                 on_accept: AcceptHandler, metrics: ListenerMetrics,
                 resource_pause: float = 1.0) -> None:
        self.name = name
        self.socks = socks
        self.backlog = backlog
        self.on_accept = on_accept
        self.metrics = metrics
        self.resource_pause = resource_pause
        self.is_open = False
        self.reason = "start"
        self.drained = False  # operator override: closed for maintenance
        self.holds: dict[str, float] = {}  # reason -> loop time until which we stay closed
        self._want_open = False
        self.stopping = False
        # a socket handed over by systemd is already listening (and may hold the very
        # connection that triggered the activation): it stays so until the first verdict
        self._listening_at_start = any(
            s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) for s in socks)
        self._backoff: asyncio.TimerHandle | None = None
        self._hold_timer: asyncio.TimerHandle | None = None
        self._closing: asyncio.TimerHandle | None = None  # CLOSE_SETTLE still running
        self._loop = asyncio.get_running_loop()
        self.transitions = 0

    @property
    def settling(self) -> bool:
        """Closed for new SYNs, still accepting in-flight handshakes (CLOSE_SETTLE)."""
        return self._closing is not None

    # --- the decision -------------------------------------------------------------------

    def set_healthy(self, healthy: bool, reason: str = "probe") -> None:
        """The backends' verdict; the gate follows it unless an override holds it closed."""
        self._want_open = healthy
        self._apply(reason)

    def drain(self) -> None:
        self.drained = True
        self._apply("drain")

    def resume(self) -> None:
        self.drained = False
        self._apply("resume")

    def stop(self) -> None:
        """Shutting down: close for good (the queue is drained and answered)."""
        self.stopping = True
        self._apply("shutdown")

    def hold_closed(self, reason: str, seconds: float) -> None:
        """Close for a while (xinetd's cps pause, resource exhaustion), then follow health."""
        until = self._loop.time() + seconds
        self.holds[reason] = max(until, self.holds.get(reason, 0.0))
        log.warning("gate.hold", listener=self.name, reason=reason, seconds=seconds)
        self._apply(reason)
        self._schedule_hold_check()

    def _schedule_hold_check(self) -> None:
        if self._hold_timer:
            self._hold_timer.cancel()
            self._hold_timer = None
        if self.holds:
            when = min(self.holds.values())
            self._hold_timer = self._loop.call_at(when, self._hold_expired)

    def _hold_expired(self) -> None:
        now = self._loop.time()
        expired = [r for r, t in self.holds.items() if t <= now]
        for r in expired:
            del self.holds[r]
        self._schedule_hold_check()
        self._apply(expired[0] + "_over" if expired else "hold_over")

    def _apply(self, reason: str) -> None:
        should = (self._want_open and not self.drained and not self.holds
                  and not self.stopping)
        if should and not self.is_open:
            self._open(reason)
        elif not should and (self.is_open or self._listening_at_start):
            self._close(reason)
        self._listening_at_start = False

    # --- the mechanism ------------------------------------------------------------------

    def _open(self, reason: str) -> None:
        if self._closing is not None:  # never stopped listening: let SYNs in again
            self._closing.cancel()
            self._closing = None
            for s in self.socks:
                _drop_syns(s, False)
            self.is_open = True  # no transition: from outside the gate never closed
            return
        else:
            for s in self.socks:
                relisten(s, self.backlog)
                self._loop.add_reader(s.fileno(), self._accept_ready, s)
        self.is_open = True
        self._transition("open", reason)

    def _close(self, reason: str) -> None:
        if self._backoff:
            self._backoff.cancel()
            self._backoff = None
        filtered = all([_drop_syns(s, True) for s in self.socks])
        was_open, self.is_open = self.is_open, False
        if filtered and was_open and not self.stopping:
            # accepting goes on (each one answered 421 or spliced) until in-flight
            # handshakes are done; see the module docstring
            for s in self.socks:
                self._accept_all(s, limit=None)
            self._closing = self._loop.call_later(CLOSE_SETTLE, self._finish_close, reason)
        else:
            self._finish_close(reason)

    def _finish_close(self, reason: str) -> None:
        """Out of LISTEN: from now on a SYN is refused; that is when the gate is closed."""
        self._closing = None
        for s in self.socks:
            self._loop.remove_reader(s.fileno())
            self._accept_all(s, limit=None)  # the queue: answer, don't reset
            try:
                unlisten(s)
            except OSError as e:  # ENOTCONN on kernels without the trick: say so loudly
                log.error("gate.unlisten_failed", listener=self.name, error=e.strerror)
            _drop_syns(s, False)
        self._transition("closed", reason)

    def _transition(self, state: str, reason: str) -> None:
        self.reason = reason
        self.transitions += 1
        self.metrics.transition(state, reason)
        log.info("gate." + state, listener=self.name, reason=reason)

    def _accept_ready(self, sock: socket.socket) -> None:
        self._accept_all(sock, limit=ACCEPT_BATCH)

    def _accept_all(self, sock: socket.socket, limit: int | None) -> None:
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
                if e.errno in _RESOURCE_ERRNOS:
                    self._resource_exhausted(sock, e)
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                if e.errno == errno.EINVAL:  # not listening (closed under us)
                    return
                raise
            n += 1
            try:
                self.on_accept(conn, addr)
            except Exception:
                log.exception("gate.handler_failed", listener=self.name)
                conn.close()

    def _resource_exhausted(self, sock: socket.socket, e: OSError) -> None:
        """Out of fds/buffers: stop polling this socket for a moment instead of spinning.

        The socket stays in LISTEN, so the kernel queues new clients meanwhile.
        """
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        accept_errors.labels(self.name, name).inc()
        if self._backoff is not None:
            return
        log.warning("gate.accept_paused", listener=self.name, error=name,
                    seconds=self.resource_pause)
        for s in self.socks:
            self._loop.remove_reader(s.fileno())

        def again() -> None:
            self._backoff = None
            if self.is_open:
                for s in self.socks:
                    self._loop.add_reader(s.fileno(), self._accept_ready, s)
        self._backoff = self._loop.call_later(self.resource_pause, again)

    def release(self) -> None:
        """At exit: stop accepting; sockets from systemd go back to LISTEN for the next
        instance (the socket unit keeps queueing), our own are closed."""
        if self._backoff:
            self._backoff.cancel()
        if self._hold_timer:
            self._hold_timer.cancel()
        if self._closing is not None:
            self._closing.cancel()
            self._finish_close("shutdown")
        for s in self.socks:
            if self.is_open:
                self._loop.remove_reader(s.fileno())
        self.is_open = False
