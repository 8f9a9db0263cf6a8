"""The connections of one listener, from accept to their end: admission done, each goes
through the hand-off (handoff.py) to a Splice, or gets its refusal (421 in smtp mode, a
close in tcp mode); then metrics, the access release and a (sampled) log line.

This class is the one writer of the connection bookkeeping: the sets of pending hand-offs,
splices and refusals, the active gauge.  The hand-off reports through the Sink methods
(`ready`, `refused`), the splice through its done callback, and every path that ends a
connection passes `_release()` exactly once (which calls the owner's `release` for the
access counters).  The master's Listener and a worker process (worker.py) both use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Sequence
from functools import partial

import structlog

from ..config.model import ListenerConfig
from ..net.sockets import fmt_addr, reset
from ..ops import supervise
from ..ops.logs import Sampler
from ..ops.metrics import ListenerMetrics
from ..ops.system import tune
from .acceptor import Address
from .access import Access
from .core import Relayed, core_relay, relay_pair
from .deadlines import Deadlines
from .handoff import Candidate, Handoff, Plan, dial
from .poller import Poller

log = structlog.get_logger("forwarder.connections")

LINGER_421 = 2.0  # how long we wait for the client's FIN after a 421, before closing


def reply_busy(hostname: str) -> bytes:
    return (f"421 4.7.0 {hostname} Too many connections, try again later\r\n"
            .encode("ascii", "replace"))


def reply_421(hostname: str) -> bytes:
    return (f"421 4.3.2 {hostname} Service not available, closing transmission channel\r\n"
            .encode("ascii", "replace"))


class Connections:
    def __init__(self, cfg: ListenerConfig, hostname: str, metrics: ListenerMetrics,
                 release: Callable[[str], None] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.metrics = metrics
        self._release_host = release
        self.poller = Poller.for_loop(self.loop)
        self.core = core_relay(cfg.relay, self.loop)
        self.deadlines = Deadlines(self.loop)
        self.pending: set[Handoff] = set()
        self.splices: set[Relayed] = set()
        self.refusing: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()  # set while no connection is in any of the three sets
        self._idle.set()
        self._idle_now = True  # the same as a plain flag: read per connection
        self._sampler = Sampler(per_second=20)
        self._sweeper: asyncio.Task[None] | None = None
        self.cuts = 0  # splices reset by cut() (a second SIGTERM, the drain timeout)
        self.configure(cfg, hostname)

    def configure(self, cfg: ListenerConfig, hostname: str) -> None:
        """What follows from the config (at start and at every reload)."""
        self.cfg = cfg
        self.msg_421 = reply_421(hostname)
        self.msg_busy = reply_busy(hostname)
        self.plan = Plan(sink=self, poller=self.poller, deadlines=self.deadlines,
                         dial=partial(dial, options=partial(tune, cfg=cfg)),
                         smtp=cfg.mode == "smtp", proxy=cfg.send_proxy,
                         connect_timeout=cfg.connect_timeout)

    def start(self) -> None:
        self._sweeper = supervise.spawn("sweeper", self._sweep_idle, name=self.cfg.name)

    @property
    def active(self) -> int:
        return len(self.splices)

    @property
    def waiting(self) -> int:
        return len(self.pending) + len(self.refusing)

    def by_backend(self) -> dict[str, int]:
        """Connections being relayed, per backend name."""
        out: dict[str, int] = {}
        for sp in self.splices:
            name = sp.tag[1].name
            out[name] = out.get(name, 0) + 1
        return out

    def live_hosts(self) -> list[str]:
        """The client address of every admitted connection (a reload's new Access)."""
        return [sp.tag[0][0] for sp in self.splices] + [h.addr[0] for h in self.pending]

    def admit(self, access: Access, conn: socket.socket, addr: Address,
              candidates: Sequence[Candidate]) -> None:
        """An accepted connection: the access rules first, then the hand-off."""
        if not access.trivial:
            refusal = access.admit(addr[0])
            if refusal is not None:
                self.turn_away(conn, addr, refusal)
                return
        self.accept(conn, addr, candidates)

    def accept(self, conn: socket.socket, addr: Address,
               candidates: Sequence[Candidate]) -> None:
        h = Handoff(self.plan, conn, addr, candidates)
        self.pending.add(h)
        if self._idle_now:
            self._idle_now = False
            self._idle.clear()
        h.start()

    def release_waiting(self, b: Candidate) -> None:
        """`b` was declared down: hand-offs waiting on it move on now (next backend, else
        refusal), instead of waiting out their deadline."""
        for h in [h for h in self.pending if h.backend is b and h.waiting]:
            h.release("backend down")

    def cut(self) -> None:
        """Reset every connection now (a second SIGTERM: the operator will not wait)."""
        self.cuts += len(self.splices)
        for sp in list(self.splices):
            sp.abort("error")
        for h in list(self.pending):
            self.pending.discard(h)
            h.abort()
            self._release(h.addr)
        for t in list(self.refusing):
            t.cancel()

    async def stop(self, timeout: float) -> int:
        """Let connections finish for up to `timeout`, then reset the rest.  Returns how
        many splices were cut, here or by an earlier cut()."""
        await supervise.cancel(self._sweeper)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        self.cut()
        await asyncio.gather(*self.refusing, return_exceptions=True)
        self.deadlines.close()
        return self.cuts

    def turn_away(self, conn: socket.socket, addr: Address, refusal: str) -> None:
        """Refused by access rules: no task and no lingering (this path must stay cheap
        under a flood); a rate-limited smtp client gets a reason it can act on."""
        self.metrics.outcome[refusal].inc()
        log.info("connection.refused", listener=self.cfg.name, peer=fmt_addr(addr),
                 outcome=refusal)
        if refusal == "rate_limited" and self.cfg.mode == "smtp":
            with contextlib.suppress(OSError):
                conn.send(self.msg_busy)
                conn.shutdown(socket.SHUT_WR)
        conn.close()

    def ready(self, h: Handoff, greeting: bytes) -> None:
        """Sink: the hand-off has a backend socket; the splice takes both from here."""
        self.pending.discard(h)
        assert h.bs is not None
        sp = relay_pair(self.core, self.poller, h.conn, h.bs, self._finished,
                        (h.addr, h.backend))
        sp.started = time.monotonic()
        self.splices.add(sp)
        self.metrics.active.inc()
        sp.start(greeting)

    def refused(self, h: Handoff, outcome: str) -> None:
        """Sink: no backend took the connection: the no-silent-drop rule (_refuse)."""
        self.pending.discard(h)
        t = self.loop.create_task(self._refuse(h.conn, h.addr, outcome))
        self.refusing.add(t)
        t.add_done_callback(self._refusal_done)

    def _refusal_done(self, t: asyncio.Task[None]) -> None:
        self.refusing.discard(t)
        self._check_idle()

    async def _refuse(self, conn: socket.socket, addr: Address, outcome: str) -> None:
        """421 and a clean close (smtp), or a reset (tcp): a plain FIN would make "no
        backend" look like an empty answer, and a client that has sent a request already
        would take its loss for a normal end."""
        self.metrics.outcome[outcome].inc()
        log.warning("connection.no_backend", listener=self.cfg.name, peer=fmt_addr(addr),
                    outcome=outcome)
        try:
            if self.cfg.mode != "smtp":
                reset(conn)
                return
            conn.setblocking(False)
            conn.send(self.msg_421)
            conn.shutdown(socket.SHUT_WR)
            # read until the client's FIN so close() does not turn into a RST that
            # could destroy the 421 before the client reads it
            async with asyncio.timeout(LINGER_421):
                while await self.loop.sock_recv(conn, 4096):
                    pass
        except (OSError, TimeoutError):
            pass
        finally:
            conn.close()
            self._release(addr)

    def _finished(self, sp: Relayed, outcome: str) -> None:
        self.splices.discard(sp)
        m = self.metrics
        m.active.dec()
        m.outcome[outcome].inc()
        up, down = sp.bytes_up, sp.bytes_down
        m.bytes_up.inc(up)
        m.bytes_down.inc(down)
        duration = time.monotonic() - sp.started
        m.duration.observe(duration)
        addr, backend = sp.tag
        self._release(addr)
        if self._sampler.allow():
            log.info("splice.finished", listener=self.cfg.name, peer=fmt_addr(addr),
                     backend=backend.name, bytes_up=up, bytes_down=down,
                     duration=round(duration, 4), outcome=outcome,
                     suppressed=self._sampler.take_suppressed())

    def _release(self, addr: Address) -> None:
        """The one end of every admitted connection."""
        if self._release_host is not None:
            self._release_host(addr[0])
        if not (self.pending or self.splices or self.refusing):
            self._idle_now = True
            self._idle.set()

    def _check_idle(self) -> None:
        if not (self.pending or self.splices or self.refusing):
            self._idle_now = True
            self._idle.set()

    def set_release(self, release: Callable[[str], None] | None) -> None:
        """What ends an admitted connection's count (None: nothing is counted)."""
        self._release_host = release

    # --- idle timeout -------------------------------------------------------------------

    async def _sweep_idle(self) -> None:
        """One timer per listener instead of one per connection: a splice whose byte count
        has not moved for idle_timeout is closed."""
        seen: dict[Relayed, tuple[int, float]] = {}
        while True:
            timeout = self.cfg.idle_timeout
            await asyncio.sleep(max(0.05, min(timeout / 10, 5.0)))
            now = self.loop.time()
            current: dict[Relayed, tuple[int, float]] = {}
            for sp in list(self.splices):  # abort() finishes a splice synchronously
                n = sp.nbytes
                prev = seen.get(sp)
                if prev is None or prev[0] != n:
                    current[sp] = (n, now)
                elif now - prev[1] >= timeout:
                    sp.abort("idle_timeout")
                else:
                    current[sp] = prev
            seen = current
