"""One listener: its gate, backend pool, DNS discovery and admission, and the connections.

Data flows one way: the pool decides health, the gate follows it, accepted sockets come
here, go through admission and the hand-off (handoff.py) to the best live backend, are
relayed by a Splice, and finish in metrics and a log line.  An accepted connection always
gets an answer: a splice, or a 421 (smtp mode) / close (tcp mode).

This class is the one writer of the connection bookkeeping: the sets of pending hand-offs,
splices and refusals, the active gauge and the access counters.  The hand-off reports
through the Sink methods (`ready`, `refused`), the splice through its done callback, and
every path that ends a connection passes `_release()` exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Collection
from functools import partial
from typing import Any

import structlog

from ..config.model import ListenerConfig, SockAddr
from ..health.backends import Backend, Pool
from ..health.discovery import Discovery, Scope
from ..net.sockets import fmt_addr
from ..ops import supervise
from ..ops.logs import Sampler
from ..ops.metrics import ListenerMetrics
from ..ops.system import tune
from .access import Access
from .deadlines import Deadlines
from .gate import Address, Gate
from .handoff import Handoff, Plan, dial
from .poller import Poller
from .splice import Splice

log = structlog.get_logger("forwarder.listener")

LINGER_421 = 2.0  # how long we wait for the client's FIN after a 421, before closing


def reply_busy(hostname: str) -> bytes:
    return (f"421 4.7.0 {hostname} Too many connections, try again later\r\n"
            .encode("ascii", "replace"))


def reply_421(hostname: str) -> bytes:
    return (f"421 4.3.2 {hostname} Service not available, closing transmission channel\r\n"
            .encode("ascii", "replace"))


def greeting_policy(cfg: ListenerConfig) -> tuple[float | None, float]:
    g = cfg.greeting_timeout
    return (None if g == "auto" else g), cfg.greeting_timeout_max


class Listener:
    def __init__(self, cfg: ListenerConfig, socks: list[socket.socket], hostname: str, *,
                 own: Callable[[SockAddr], bool] = lambda sa: False,
                 activated: Collection[socket.socket] = ()) -> None:
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.metrics = ListenerMetrics(cfg.name)
        self.default_hostname = hostname
        self.poller = Poller.for_loop(self.loop)
        self.deadlines = Deadlines(self.loop)
        self.pool = Pool(cfg.name, cfg.probe, cfg.send_proxy, own, greeting_policy(cfg))
        self.gate = Gate(cfg.name, socks, cfg.backlog, self._on_accept, self.metrics,
                         activated=activated)
        self.access = Access(cfg.access, self.loop.time, self.gate.hold_closed)
        self.discovery: Discovery | None = None
        self.pending: set[Handoff] = set()
        self.splices: set[Splice] = set()
        self.refusing: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()  # set while no connection is in any of the three sets
        self._idle.set()
        self._sampler = Sampler(per_second=20)
        self._sweeper: asyncio.Task[None] | None = None
        self._configure(cfg)
        self.pool.subscribe(self._health_changed)

    def _configure(self, cfg: ListenerConfig) -> None:
        """What follows from the config alone (at start and at every reload)."""
        self.cfg = cfg
        self.hostname = cfg.hostname or self.default_hostname
        self.msg_421 = reply_421(self.hostname)
        self.msg_busy = reply_busy(self.hostname)
        self.gate.backlog = cfg.backlog
        self.plan = Plan(sink=self, poller=self.poller, deadlines=self.deadlines,
                         dial=partial(dial, options=partial(tune, cfg=cfg)),
                         smtp=cfg.mode == "smtp", proxy=cfg.send_proxy,
                         connect_timeout=cfg.connect_timeout)
        # nodelay/keepalive on the listening sockets are inherited by every accepted one
        for s in self.gate.socks:
            try:
                tune(s, cfg, explicit=True)
            except OSError as e:
                log.warning("listener.sockopt_failed", listener=cfg.name, error=e.strerror)

    def _scope(self) -> Scope:
        return Scope(self.hostname, self.cfg.addresses,
                     tuple(b.endpoint for b in self.cfg.backends))

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        await self.pool.update(self.cfg.backends)
        self.pool.start()
        await self._sync_discovery()
        self._sweeper = supervise.spawn("sweeper", self._sweep_idle, name=self.cfg.name)

    async def _sync_discovery(self) -> None:
        """Discovery follows the config: started, reconfigured, or stopped with its peers
        removed from the pool (here and nowhere else)."""
        d = self.cfg.discovery
        if d is None and self.discovery is not None:
            await self.discovery.stop()
            self.discovery = None
            await self.pool.update([], source="dns")
            log.info("dns.disabled", listener=self.cfg.name)
        elif d is not None and self.discovery is None:
            self.discovery = Discovery(self.cfg.name, d, self._scope(),
                                       partial(self.pool.update, source="dns"))
            self.discovery.start()
        elif d is not None and self.discovery is not None:
            self.discovery.configure(d, self._scope())

    def healthy(self) -> bool:
        return self.pool.local_up() if self.cfg.gate == "local" else self.pool.any_up()

    def _health_changed(self, b: Backend) -> None:
        local = self.pool.local
        why = ("backend_drain" if self.cfg.gate == "local" and local is not None
               and local.up and local.draining else "probe")
        self.gate.set_healthy(self.healthy(), why)
        if not b.up:  # hand-offs waiting on it move on now (next backend, else refusal)
            for h in [h for h in self.pending if h.backend is b and h.waiting]:
                h.release("backend down")

    async def reconfigure(self, cfg: ListenerConfig) -> None:
        """Apply a reloaded config that kept our addresses; live splices are untouched."""
        self._configure(cfg)
        if cfg.access != self.access.cfg:
            old = self.access
            self.access = Access(cfg.access, self.loop.time, self.gate.hold_closed)
            self.access.take_over(old, [sp.tag[0][0] for sp in self.splices] +
                                  [h.addr[0] for h in self.pending])
        self.pool.configure(cfg.probe, cfg.send_proxy, greeting_policy(cfg))
        await self.pool.update(cfg.backends)
        await self._sync_discovery()
        self.gate.set_healthy(self.healthy())

    def cut(self) -> None:
        """Reset every connection now (a second SIGTERM: the operator will not wait)."""
        for sp in list(self.splices):
            sp.abort("error")
        for h in list(self.pending):
            self.pending.discard(h)
            h.abort()
            self._release(h.addr)
        for t in list(self.refusing):
            t.cancel()

    async def stop(self, timeout: float) -> int:
        """Close the gate, let connections finish for up to `timeout`, then reset the
        rest; let go of the sockets.  Returns how many splices were cut."""
        self.gate.stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.discovery is not None:
            await self.discovery.stop()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        cut = len(self.splices)
        self.cut()
        await asyncio.gather(*self.refusing, return_exceptions=True)
        self.deadlines.close()
        await self.pool.stop()
        self.gate.release()
        return cut

    # --- the connections ------------------------------------------------------------------

    def _on_accept(self, conn: socket.socket, addr: Address) -> None:
        if not self.access.trivial:
            refusal = self.access.admit(addr[0])
            if refusal is not None:
                self._turn_away(conn, addr, refusal)
                return
        h = Handoff(self.plan, conn, addr, self.pool.candidates())
        self.pending.add(h)
        self._idle.clear()
        h.start()

    def _turn_away(self, conn: socket.socket, addr: Address, refusal: str) -> None:
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
        sp = Splice(self.poller, h.conn, h.bs, self._finished, (h.addr, h.backend))
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
        """421 and a clean close (smtp), or a plain close (tcp)."""
        self.metrics.outcome[outcome].inc()
        log.warning("connection.no_backend", listener=self.cfg.name, peer=fmt_addr(addr),
                    outcome=outcome)
        try:
            if self.cfg.mode == "smtp":
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

    def _finished(self, sp: Splice, outcome: str) -> None:
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
        if not self.access.trivial:
            self.access.release(addr[0])
        self._check_idle()

    def _check_idle(self) -> None:
        if not (self.pending or self.splices or self.refusing):
            self._idle.set()

    # --- idle timeout -------------------------------------------------------------------

    async def _sweep_idle(self) -> None:
        """One timer per listener instead of one per connection: a splice whose byte count
        has not moved for idle_timeout is closed."""
        seen: dict[Splice, tuple[int, float]] = {}
        while True:
            timeout = self.cfg.idle_timeout
            await asyncio.sleep(max(0.05, min(timeout / 10, 5.0)))
            now = self.loop.time()
            current: dict[Splice, tuple[int, float]] = {}
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

    def status(self) -> dict[str, Any]:
        return {
            "name": self.cfg.name,
            "addresses": [str(e) for e in self.cfg.endpoints],
            "mode": self.cfg.mode,
            "gate": {**self.gate.status(), "policy": self.cfg.gate},
            "greeting_timeout": self.cfg.greeting_timeout,
            "greeting_timeout_max": self.cfg.greeting_timeout_max,
            "connections_active": len(self.splices),
            "connections_pending": len(self.pending) + len(self.refusing),
            "backends": [b.status() for b in self.pool.backends],
        }

