"""One listener: gate + backend pool + admission + the per-connection hand-off.

Data flows one way: the pool decides health, the gate follows it, accepted sockets come here,
go to the best live backend through a Splice, and finish in metrics and a log line.
An accepted connection always gets an answer: a splice, or a 421 (smtp mode) / close (tcp).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from typing import Any

import structlog

from ..config.model import ListenerConfig
from ..health.backends import Backend, Pool
from ..net import proxy_protocol
from ..ops.logs import Sampler
from ..ops.metrics import ListenerMetrics
from ..ops.system import tune
from .access import Access
from .gate import Address, Gate
from .handoff import Handoff
from .relay import Splice
from .splice import COPY_MAX, PipeSplice, Poller, poll_connect, poll_readable
from .splice import available as splice_available

log = structlog.get_logger("forwarder.listener")

LINGER_RST = struct.pack("ii", 1, 0)
HANDOFF_TICK = 0.05  # how often pending hand-offs' deadlines are checked
LINGER_421 = 2.0  # how long we wait for the client's FIN after a 421, before closing


def _resolve(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


def reply_busy(hostname: str) -> bytes:
    return (f"421 4.7.0 {hostname} Too many connections, try again later\r\n"
            .encode("ascii", "replace"))


def reply_421(hostname: str) -> bytes:
    return (f"421 4.3.2 {hostname} Service not available, closing transmission channel\r\n"
            .encode("ascii", "replace"))


class Listener:
    def __init__(self, cfg: ListenerConfig, socks: list[socket.socket], hostname: str) -> None:
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.metrics = ListenerMetrics(cfg.name)
        self.hostname = cfg.hostname or hostname
        self.msg_421 = reply_421(self.hostname)
        self.msg_busy = reply_busy(self.hostname)
        self.pool = Pool(cfg.name, cfg.backends, cfg.probe, cfg.send_proxy)
        self.gate = Gate(cfg.name, socks, cfg.backlog, self._on_accept, self.metrics)
        self.access = Access(cfg.access, self.loop.time, self.gate.hold_closed)
        self.splices: set[Splice | PipeSplice] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.handoffs: set[Handoff] = set()  # callback-driven hand-offs (splice path)
        self.poller = Poller.for_loop(self.loop)
        self._sampler = Sampler(per_second=20)
        self._sweeper: asyncio.Task[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self.pool.subscribe(self._health_changed)
        self.apply_socket_options()

    def apply_socket_options(self) -> None:
        """`nodelay` and `keepalive` on the listening sockets, inherited by every accepted
        one.  Re-applied on reload; affects connections accepted from then on."""
        for s in self.gate.socks:
            try:
                tune(s, self.cfg, explicit=True)
            except OSError as e:
                log.warning("listener.sockopt_failed", listener=self.cfg.name,
                            error=e.strerror)

    @property
    def use_splice(self) -> bool:
        """auto means splice on Linux: in the README's benchmark it matches the protocol
        relay in bulk at half the CPU per GB and sets up 1.4x the sessions per second; the
        protocol relay adds ~2 µs less to a round trip."""
        return self.cfg.relay != "protocol" and splice_available()

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self.pool.start()
        self._sweeper = self.loop.create_task(self._sweep_idle(), name=f"idle {self.cfg.name}")

    def healthy(self) -> bool:
        return self.pool.local_up() if self.cfg.gate == "local" else self.pool.any_up()

    def _health_changed(self) -> None:
        self.gate.set_healthy(self.healthy())

    async def reconfigure(self, cfg: ListenerConfig) -> None:
        """Apply a reloaded config that kept our addresses; live splices are untouched."""
        self.cfg = cfg
        self.hostname = cfg.hostname or self.hostname
        self.msg_421 = reply_421(self.hostname)
        self.msg_busy = reply_busy(self.hostname)
        self.gate.backlog = cfg.backlog
        self.apply_socket_options()
        if cfg.access != self.access.cfg:
            old = self.access
            self.access = Access(cfg.access, self.loop.time, self.gate.hold_closed)
            if old.trivial:  # nothing was counted: count the live connections now
                for sp in self.splices:
                    self.access.count(sp.tag[0][0])
                for h in self.handoffs:
                    self.access.count(h.addr[0])
            else:
                self.access.active, self.access.per_source = old.active, old.per_source
        await self.pool.update(cfg.backends, cfg.probe, cfg.send_proxy)
        self._health_changed()

    async def stop(self, timeout: float) -> int:
        """Close the gate, let splices finish for up to `timeout`, then reset the rest.
        Returns how many were cut."""
        self.gate.stop()
        if self._sweeper:
            self._sweeper.cancel()
        deadline = self.loop.time() + timeout
        while (self.splices or self.tasks or self.handoffs) and self.loop.time() < deadline:
            waiters = [t for t in self.tasks if not t.done()]
            await asyncio.wait(waiters or [self.loop.create_task(asyncio.sleep(0.05))],
                               timeout=min(0.05, max(0.0, deadline - self.loop.time())))
        cut = len(self.splices)
        for s in list(self.splices):
            s.abort("error")
        for h in list(self.handoffs):
            h.abort()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for t in list(self.tasks):
            t.cancel()
        await self.pool.stop()
        self.gate.release()
        return cut

    # --- accept path --------------------------------------------------------------------

    def _on_accept(self, conn: socket.socket, addr: Address) -> None:
        host = addr[0]
        refusal = self.access.admit(host) if not self.access.trivial else None
        if refusal is not None:
            self.metrics.outcome[refusal].inc()
            log.info("connection.refused", listener=self.cfg.name, peer=host, outcome=refusal)
            if refusal == "rate_limited" and self.cfg.mode == "smtp":
                # a reason the sender can act on (retry later), not a bare close; no task
                # and no lingering: this path must stay cheap under a flood
                with contextlib.suppress(OSError):
                    conn.send(self.msg_busy)
                    conn.shutdown(socket.SHUT_WR)
            conn.close()
            return
        if self.use_splice:
            cands = self.pool.candidates()
            if all(b.sockaddr is not None for b in cands):
                Handoff(self, conn, addr, cands).start()
                return
        t = self.loop.create_task(self._serve(conn, addr))
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    def watch(self, h: Handoff) -> None:
        """Track a hand-off; its connect/greeting deadline is checked every HANDOFF_TICK
        while any is pending (limits are honoured to within that tick)."""
        self.handoffs.add(h)
        if self._watchdog is None:
            self._watchdog = self.loop.call_later(HANDOFF_TICK, self._check_handoffs)

    def _check_handoffs(self) -> None:
        self._watchdog = None
        now = self.loop.time()
        for h in [h for h in self.handoffs if h.deadline <= now]:
            try:
                h.expire()
            except Exception:  # the watchdog must outlive any one bad hand-off
                log.exception("handoff.expire_failed", listener=self.cfg.name)
                h.abort()
        if self.handoffs:
            self._watchdog = self.loop.call_later(HANDOFF_TICK, self._check_handoffs)

    def refuse_later(self, conn: socket.socket, addr: Address, outcome: str) -> None:
        """For the hand-off: the 421 path waits for the client's FIN, so it is a task."""
        t = self.loop.create_task(self._refuse(conn, addr, outcome))
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    def release(self, addr: Address) -> None:
        if not self.access.trivial:
            self.access.release(addr[0])

    async def _serve(self, conn: socket.socket, addr: Address) -> None:
        cfg = self.cfg
        tried = 0
        splice: Splice | PipeSplice | None = None
        try:
            for b in self.pool.candidates():
                tried += 1
                greeting = b""
                if self.use_splice:
                    got = await self._attempt_raw(b, conn)
                    if got is not None:
                        bsock, greeting = got
                        splice = PipeSplice(self.loop, conn, bsock, self._finished, (addr, b))
                else:
                    splice = await self._attempt(b, conn, addr)
                if splice is not None:
                    break
            if splice is None:
                outcome = "backend_failed_421" if tried else "no_backend_421"
                await self._refuse(conn, addr, outcome)
                return
            splice.started = time.monotonic()
            self.splices.add(splice)
            self.metrics.active.inc()
            if isinstance(splice, PipeSplice):
                splice.start(greeting)
            else:
                sp = splice
                await self.loop.connect_accepted_socket(lambda: sp.client, conn)
                sp.join()
        except (OSError, asyncio.CancelledError) as e:  # client vanished, or shutdown
            log.debug("connection.handoff_failed", listener=cfg.name, error=repr(e))
            conn.close()
            if splice is None:
                if not self.access.trivial:
                    self.access.release(addr[0])
            else:
                splice.abort("error")
                if splice in self.splices:
                    self._finished(splice, "error")
            if isinstance(e, asyncio.CancelledError):
                raise

    async def _attempt(self, b: Backend, conn: socket.socket, addr: Address) -> Splice | None:
        """Connect to one backend (and, in smtp mode, wait for its greeting)."""
        cfg = self.cfg
        splice = Splice(self._finished, tag=(addr, b))
        t0 = self.loop.time()
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                transport, _ = await self.loop.create_connection(
                    lambda: splice.backend, b.endpoint.host, b.endpoint.port)
        except (OSError, TimeoutError) as e:
            b.passive_failure("connect", str(e) or "timeout")
            return None
        b.metrics.connect.observe(self.loop.time() - t0)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # uvloop turns TCP_NODELAY on for every transport
            with contextlib.suppress(OSError):
                tune(sock, cfg)
        if cfg.send_proxy:
            transport.write(proxy_protocol.header_for_socket(cfg.send_proxy, conn))
        if cfg.mode != "smtp":
            return splice
        side = splice.backend
        if not side.early:
            ok = False
            if not (side.eof or side.gone):
                side.first_data = self.loop.create_future()
                ok = await self._within(side.first_data, cfg.greeting_timeout)
            if not ok:
                transport.abort()
                b.passive_failure("greeting", "no greeting before close/timeout")
                return None
        return splice

    async def _attempt_raw(self, b: Backend,
                           conn: socket.socket) -> tuple[socket.socket, bytes] | None:
        """The same as _attempt, for the os.splice relay: a plain connected socket.

        Waits go through the splice Poller, not loop.sock_connect()/add_reader(): uvloop
        drops those silently when the fd reports EPOLLERR (an asynchronous refusal, a RST),
        and the wait would run into its timeout instead of failing at once."""
        cfg = self.cfg
        ep = b.endpoint
        t0 = self.loop.time()
        try:
            bs = await poll_connect(self.loop, ep.host, ep.port, cfg.connect_timeout)
        except (OSError, TimeoutError) as e:
            b.passive_failure("connect", str(e) or "timeout")
            return None
        b.metrics.connect.observe(self.loop.time() - t0)
        tune(bs, cfg)
        if cfg.send_proxy:
            bs.send(proxy_protocol.header_for_socket(cfg.send_proxy, conn))
        greeting = b""
        if cfg.mode == "smtp":  # read here, not peeked: see Handoff._greeted
            ok = await poll_readable(self.loop, bs, cfg.greeting_timeout)
            try:
                greeting = bs.recv(COPY_MAX) if ok else b""
            except OSError:
                greeting = b""
            if not greeting:
                bs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
                bs.close()
                b.passive_failure("greeting", "no greeting before close/timeout")
                return None
        return bs, greeting

    async def _within(self, fut: asyncio.Future[bool], timeout: float) -> bool:
        """fut's result, or False after `timeout`.  A timer instead of wait_for, which
        would cost a task per connection."""
        timer = self.loop.call_later(timeout, _resolve, fut, False)
        try:
            return await fut
        finally:
            timer.cancel()

    async def _refuse(self, conn: socket.socket, addr: Address, outcome: str) -> None:
        """The no-silent-drop rule: 421 and a clean close (smtp), or a plain close (tcp)."""
        self.metrics.outcome[outcome].inc()
        log.warning("connection.no_backend", listener=self.cfg.name, peer=addr[0],
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
            if not self.access.trivial:
                self.access.release(addr[0])

    def _finished(self, splice: Splice | PipeSplice, outcome: str) -> None:
        self.splices.discard(splice)
        m = self.metrics
        m.active.dec()
        m.outcome[outcome].inc()
        up, down = splice.bytes_up, splice.bytes_down
        m.bytes_up.inc(up)
        m.bytes_down.inc(down)
        duration = time.monotonic() - splice.started
        m.duration.observe(duration)
        addr, backend = splice.tag
        if not self.access.trivial:
            self.access.release(addr[0])
        if self._sampler.allow():
            log.info("splice.finished", listener=self.cfg.name, peer=f"{addr[0]}:{addr[1]}",
                     backend=backend.name, bytes_up=up, bytes_down=down,
                     duration=round(duration, 4), outcome=outcome,
                     suppressed=self._sampler.take_suppressed())

    # --- idle timeout -------------------------------------------------------------------

    async def _sweep_idle(self) -> None:
        """One timer per listener instead of one per connection: a splice whose byte count
        has not moved for idle_timeout is closed."""
        seen: dict[Splice | PipeSplice, tuple[int, float]] = {}
        while True:
            timeout = self.cfg.idle_timeout
            await asyncio.sleep(max(0.05, min(timeout / 10, 5.0)))
            try:
                seen = self._sweep_once(seen, timeout)
            except Exception:  # the sweeper must outlive any one bad splice
                log.exception("idle.sweep_failed", listener=self.cfg.name)

    def _sweep_once(self, seen: dict[Splice | PipeSplice, tuple[int, float]],
                    timeout: float) -> dict[Splice | PipeSplice, tuple[int, float]]:
        now = self.loop.time()
        current: dict[Splice | PipeSplice, tuple[int, float]] = {}
        for s in list(self.splices):  # abort() may finish a splice synchronously
            n = s.nbytes
            prev = seen.get(s)
            if prev is None or prev[0] != n:
                current[s] = (n, now)
            elif now - prev[1] >= timeout:
                s.abort("idle_timeout")
            else:
                current[s] = prev
        return current

    def status(self) -> dict[str, Any]:
        return {
            "name": self.cfg.name,
            "addresses": [str(e) for e in self.cfg.endpoints],
            "mode": self.cfg.mode,
            "gate": {"state": "open" if self.gate.is_open else "closed",
                     "reason": self.gate.reason, "drained": self.gate.drained,
                     "policy": self.cfg.gate, "holds": sorted(self.gate.holds)},
            "connections_active": len(self.splices),
            "connections_pending": len(self.tasks) + len(self.handoffs),
            "backends": [b.status() for b in self.pool.backends],
        }
