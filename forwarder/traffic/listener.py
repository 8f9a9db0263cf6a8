"""One listener: its gate, backend pool, DNS discovery, admission, and its connections.

Data flows one way: the pool decides health, the gate follows it, accepted sockets come
here, pass admission (access.py, whose counters this class owns), and go to Connections
(connections.py), which hands them to the best live backend and relays them.  An accepted
connection always gets an answer: a splice, or a 421 (smtp mode) / close (tcp mode).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Collection
from functools import partial
from typing import Any, Protocol

import structlog

from ..config.model import ListenerConfig, SockAddr
from ..health.backends import Backend, Pool
from ..health.discovery import Discovery, Scope
from ..ops.metrics import ListenerMetrics
from ..ops.system import tune
from .acceptor import Address
from .access import Access
from .connections import Connections
from .gate import Gate

log = structlog.get_logger("forwarder.listener")

class Workers(Protocol):
    """What a listener tells its worker processes (workers/hub.py implements it)."""

    def listening(self, name: str, on: bool) -> None: ...

    def backends_changed(self, name: str) -> None: ...

    def counts(self, name: str) -> tuple[int, int]: ...

    def by_backend(self, name: str) -> dict[str, int]: ...


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
        self.pool = Pool(cfg.name, cfg.probe, cfg.send_proxy, own, greeting_policy(cfg))
        self.gate = Gate(cfg.name, socks, cfg.backlog, self._on_accept, self.metrics,
                         activated=activated)
        self.access = Access(cfg.access, self.loop.time, self.gate.hold_closed)
        self.discovery: Discovery | None = None
        self.conns = Connections(cfg, cfg.hostname or hostname, self.metrics,
                                 None if self.access.trivial else self._release)
        self.workers: Workers | None = None  # worker processes accept for us (workers/hub.py)
        self._configure(cfg)
        self.pool.subscribe(self._health_changed)

    def use_workers(self, workers: Workers) -> None:
        """From now on worker processes accept on our sockets; we tell them when to."""
        self.workers = workers
        self.gate.on_listening = lambda on: workers.listening(self.cfg.name, on)

    def _configure(self, cfg: ListenerConfig) -> None:
        """What follows from the config alone (at start and at every reload)."""
        self.cfg = cfg
        self.hostname = cfg.hostname or self.default_hostname
        self.conns.configure(cfg, self.hostname)
        self.gate.backlog = cfg.backlog
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
        self.conns.start()

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
        if not b.up:
            self.conns.release_waiting(b)
        if self.workers is not None:
            self.workers.backends_changed(self.cfg.name)

    async def reconfigure(self, cfg: ListenerConfig) -> None:
        """Apply a reloaded config that kept our addresses; live splices are untouched."""
        self._configure(cfg)
        if cfg.access != self.access.cfg:
            old = self.access
            self.access = Access(cfg.access, self.loop.time, self.gate.hold_closed)
            self.access.take_over(old, self.conns.live_hosts())
            self.conns.set_release(None if self.access.trivial else self._release)
        self.pool.configure(cfg.probe, cfg.send_proxy, greeting_policy(cfg))
        await self.pool.update(cfg.backends)
        await self._sync_discovery()
        self.gate.set_healthy(self.healthy())

    def cut(self) -> None:
        """Reset every connection now (a second SIGTERM: the operator will not wait)."""
        self.conns.cut()

    async def stop(self, timeout: float) -> int:
        """Close the gate, let connections finish for up to `timeout`, then reset the
        rest; let go of the sockets.  Returns how many splices were cut."""
        self.gate.stop()
        if self.discovery is not None:
            await self.discovery.stop()
        cut = await self.conns.stop(timeout)
        await self.pool.stop()
        self.gate.release()
        return cut

    # --- admission ------------------------------------------------------------------------

    def _on_accept(self, conn: socket.socket, addr: Address) -> None:
        if self.access.trivial:  # the common case, one call shorter
            self.conns.accept(conn, addr, self.pool.candidates())
        else:
            self.conns.admit(self.access, conn, addr, self.pool.candidates())

    def _release(self, host: str) -> None:
        if not self.access.trivial:
            self.access.release(host)

    @property
    def active(self) -> int:
        """Connections being relayed, here and in the worker processes."""
        remote = self.workers.counts(self.cfg.name)[0] if self.workers is not None else 0
        return self.conns.active + remote

    def status(self) -> dict[str, Any]:
        remote = self.workers.counts(self.cfg.name) if self.workers is not None else (0, 0)
        live = self.conns.by_backend()
        if self.workers is not None:
            for b, n in self.workers.by_backend(self.cfg.name).items():
                live[b] = live.get(b, 0) + n
        return {
            "name": self.cfg.name,
            "addresses": [str(e) for e in self.cfg.endpoints],
            "mode": self.cfg.mode,
            "gate": {**self.gate.status(), "policy": self.cfg.gate},
            "greeting_timeout": self.cfg.greeting_timeout,
            "greeting_timeout_max": self.cfg.greeting_timeout_max,
            "connections_active": self.conns.active + remote[0],
            "connections_pending": self.conns.waiting + remote[1],
            "backends": [{**b.status(), "connections_active": live.get(b.name, 0)}
                         for b in self.pool.backends],
        }
