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

Every kernel call in a transition can fail, and a failure must never escape into the caller
(a prober delivering a verdict): the first build lost its prober that way and kept the port
closed for good.  A failed listen() (another process took the port: net/sockets.py says how
we keep that from happening, this is for what slips through) leaves the gate closed with
reason `open_failed`, is logged as `gate.open_failed` with the errno and who holds the port
when /proc shows it, counted in forwarder_gate_open_failures_total, shown in /status and
/readyz, and retried with a backoff (RETRY_FIRST doubling to RETRY_MAX) until it works.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import socket
import struct
import time
from collections.abc import Callable, Collection
from typing import Any

import structlog

from ..net.sockets import relisten, unlisten
from ..ops import history, supervise
from ..ops.metrics import ListenerMetrics, gate_open_failures
from ..ops.system import port_holder
from .acceptor import AcceptHandler, Acceptor

log = structlog.get_logger("forwarder.gate")


CLOSE_SETTLE = 0.1  # seconds a closing gate still accepts in-flight handshakes
RETRY_FIRST = 0.1  # a failed listen() is retried after this, doubling ...
RETRY_MAX = 5.0  # ... up to this

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


_filter_told = False


def _drop_syns(sock: socket.socket, on: bool) -> bool:
    global _filter_told
    try:
        if on:
            sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, _DROP_SYN_PROG)
        else:
            sock.setsockopt(socket.SOL_SOCKET, _SO_DETACH_FILTER, 0)
        return True
    except OSError as e:
        if on and not _filter_told:  # some kernels want CAP_NET_ADMIN for this
            _filter_told = True
            log.info("gate.syn_filter_unavailable", error=e.strerror,
                     detail="this kernel does not let an unprivileged process attach the "
                            "socket filter that makes closing seamless; the gate still "
                            "closes and reopens as it should, but a client whose handshake "
                            "completes in the very instant of closing may get a reset "
                            "instead of an answer (measured: a few per 1,000 flaps)")
        return False


class Gate:
    def __init__(self, name: str, socks: list[socket.socket], backlog: int,
                 on_accept: AcceptHandler, metrics: ListenerMetrics,
                 resource_pause: float = 1.0,
                 activated: Collection[socket.socket] = ()) -> None:
        self.name = name
        self.socks = socks
        self.activated = [s for s in socks if s in activated]  # systemd's: handed back
        self.acceptor = Acceptor(name, socks, on_accept, resource_pause=resource_pause)
        # worker processes accept on these sockets when set (workers/hub.py): the gate
        # then only tells them, and accepts itself only to answer its queue when closing
        self.on_listening: Callable[[bool], None] | None = None
        self.backlog = backlog
        self.metrics = metrics
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
        self._hold_timer: asyncio.TimerHandle | None = None
        self._closing: asyncio.TimerHandle | None = None  # CLOSE_SETTLE still running
        self._retry: asyncio.TimerHandle | None = None  # a failed listen(), to be retried
        self._retry_wait = RETRY_FIRST
        self.open_error: dict[str, Any] | None = None  # the last failed listen(), if failing
        self.open_failures = 0  # in the current run of failures
        self._loop = asyncio.get_running_loop()
        self.transitions = 0
        self.since = time.time()  # wall clock of the last state change (or of the start)

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

    @property
    def should_open(self) -> bool:
        return (self._want_open and not self.drained and not self.holds
                and not self.stopping)

    def _apply(self, reason: str) -> None:
        """Never raises: whatever the kernel says, the caller (a prober) goes on."""
        try:
            if self.should_open and not self.is_open:
                self._open(reason)
            elif not self.should_open and (self.is_open or self._listening_at_start):
                self._close(reason)
            elif not self.should_open and self.open_error is not None:
                self.reason = reason  # no longer trying to open: say why we are closed
                self._cancel_retry()
            self._listening_at_start = False
        except Exception:
            supervise.internal_error("gate", "gate.action_failed", listener=self.name,
                                     reason=reason)

    # --- the mechanism ------------------------------------------------------------------

    def _open(self, reason: str) -> None:
        if self._closing is not None:  # never stopped listening: let SYNs in again
            self._closing.cancel()
            self._closing = None
            for s in self.socks:
                _drop_syns(s, False)
            self.is_open = True  # no transition: from outside the gate never closed
            return
        done: list[socket.socket] = []
        try:
            for s in self.socks:
                relisten(s, self.backlog)
                done.append(s)
        except OSError as e:
            for s in done:  # all or nothing: "open" means every address accepts
                try:
                    unlisten(s)
                except OSError:
                    pass
            self._open_failed(self.socks[len(done)], e)
            return
        self._listening(True)
        self._cancel_retry()
        failures, self.open_failures, self.open_error = self.open_failures, 0, None
        self._retry_wait = RETRY_FIRST
        self.is_open = True
        self._transition("open", reason if not failures else "open_retry",
                         after_failures=failures or None)

    def _open_failed(self, sock: socket.socket, e: OSError) -> None:
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        try:
            addr = sock.getsockname()
            where = f"{addr[0]}:{addr[1]}"
            holder = port_holder(int(addr[1]))
        except OSError:
            where, holder = "?", None
        self.open_failures += 1
        self.open_error = {"errno": name, "error": e.strerror or str(e), "address": where,
                           "holder": holder, "failures": self.open_failures,
                           "retry_in": round(self._retry_wait, 3)}
        gate_open_failures.labels(self.name, name).inc()
        if self.reason != "open_failed":
            self.reason = "open_failed"
            self.since = time.time()
        if self.open_failures == 1:
            history.record("gate.open_failed", listener=self.name, reason=e.strerror,
                           address=where, holder=holder)
        (log.error if self.open_failures == 1 or self.open_failures % 20 == 0 else log.debug)(
            "gate.open_failed", listener=self.name, address=where, errno=name,
            error=e.strerror, holder=holder or "not visible to this process",
            failures=self.open_failures, retry_in=round(self._retry_wait, 3))
        self._cancel_retry()
        self._retry = self._loop.call_later(self._retry_wait, self._apply, "open_retry")
        self._retry_wait = min(self._retry_wait * 2, RETRY_MAX)

    def _cancel_retry(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if not self.should_open and self.open_error is not None:
            self.open_error, self.open_failures = None, 0  # no longer trying
            self._retry_wait = RETRY_FIRST

    def _listening(self, on: bool) -> None:
        if self.on_listening is not None:
            self.on_listening(on)
        elif on:
            self.acceptor.on()
        else:
            self.acceptor.off()

    def _close(self, reason: str) -> None:
        filtered = all([_drop_syns(s, True) for s in self.socks])
        was_open, self.is_open = self.is_open, False
        if filtered and was_open and not self.stopping:
            # accepting goes on (each one answered 421 or spliced) until in-flight
            # handshakes are done; see the module docstring
            self.acceptor.drain()
            self._closing = self._loop.call_later(CLOSE_SETTLE, self._finish_close, reason)
        else:
            self._finish_close(reason)

    def _finish_close(self, reason: str) -> None:
        """Out of LISTEN: from now on a SYN is refused; that is when the gate is closed."""
        self._closing = None
        self._listening(False)
        for s in self.socks:
            self.acceptor.batch(s, None)  # the queue: answer, don't reset
            try:
                unlisten(s)
            except OSError as e:  # ENOTCONN on kernels without the trick: say so loudly
                log.error("gate.unlisten_failed", listener=self.name, error=e.strerror)
            _drop_syns(s, False)
        self._transition("closed", reason)

    def _transition(self, state: str, reason: str, **extra: object) -> None:
        self.since = time.time()
        self.reason = reason
        self.transitions += 1
        self.metrics.transition(state, reason)
        fields = {k: v for k, v in extra.items() if v is not None}
        log.info("gate." + state, listener=self.name, reason=reason, **fields)
        history.record("gate." + state, listener=self.name, reason=reason, **fields)

    def release(self) -> None:
        """At exit (or when a reload removes the listener): stop accepting and let go of
        the sockets.  Our own are closed; sockets from systemd go back to LISTEN first, so
        the socket unit keeps queueing clients for the next instance and a restart refuses
        no SYN."""
        for t in (self._hold_timer, self._retry):
            if t is not None:
                t.cancel()
        self._hold_timer = self._retry = None
        if self._closing is not None:
            self._closing.cancel()
            self._finish_close("shutdown")
        self.acceptor.close()
        self.is_open = False
        for s in self.socks:
            if s in self.activated:
                try:
                    relisten(s, self.backlog)
                except OSError as e:
                    log.error("gate.handback_failed", listener=self.name, error=e.strerror)
            s.close()

    def status(self) -> dict[str, Any]:
        return {"state": "open" if self.is_open else "closed", "reason": self.reason,
                "since": self.since, "drained": self.drained, "holds": sorted(self.holds),
                "open_error": self.open_error}
