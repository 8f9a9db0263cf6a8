"""The master's side of the worker processes (`workers` > 1).

Why workers: one Python thread tops out near one core; the connection path (accept,
hand-off, splice set-up) is where a short session spends its CPU.  Workers are forked (by
the fork server, zygote.py) sharing the listeners' socket descriptions, so the gate stays
one socket per address: the master's listen()/shutdown() opens and closes the port for all
of them, and its SYN filter covers all of them.

What crosses (ipc.py messages), and who owns it:
- master -> worker: each listener's config and sockets; its backend table (name,
  address, greeting deadline, available: the master's verdicts, pushed when they change);
  "accept on/off" when the gate starts or stops listening; stop, cut, drop.
- worker -> master: passive failures (the master's Backend records them, as traffic of its
  own would); every 0.25 s its counters (merged into the master's /metrics by
  ops.metrics.Merger) and its connection counts (for /status).
A worker that exits unexpectedly is logged, counted (internal_errors{task="worker"}) and
replaced after a backoff; its connections are lost with it (what a crashed process means),
its counters stay in the totals.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import structlog

from ..net import ipc
from ..ops import metrics, supervise
from .zygote import Zygote

if TYPE_CHECKING:
    from ..traffic.listener import Listener

log = structlog.get_logger("forwarder.workers")

Table = list[tuple[str, Any, float, bool]]


def _nothing() -> None:
    """A worker's channel closing says nothing: its exit comes from the fork server."""
RESTART_FIRST, RESTART_MAX = 0.2, 10.0


class Link:
    """One worker as the master sees it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.pid = 0
        self.chan: ipc.Channel | None = None
        self.ready = asyncio.Event()
        self.exited = asyncio.Event()
        self.counts: dict[str, tuple[int, int, dict[str, int]]] = {}
        self.stopped = False
        self.cut = 0  # connections it reset when it stopped
        self.restarts = 0


class Hub:
    def __init__(self, zygote: Zygote, count: int,
                 listeners: Callable[[], dict[str, Listener]], log_cfg: tuple[str, str]) -> None:
        self.zygote = zygote
        self.links = [Link(i) for i in range(count)]
        self.listeners = listeners
        self.log_cfg = log_cfg
        self.merger = metrics.Merger()
        self.loop = asyncio.get_running_loop()
        self.zchan = ipc.Channel(zygote.sock, self._zygote_message, self._zygote_gone)
        self.tables: dict[str, Table] = {}
        self.accepting: dict[str, bool] = {}
        self.stopping = False
        self._sync: asyncio.Task[None] | None = None

    # --- start, and a worker's life -------------------------------------------------------

    async def start(self) -> None:
        for link in self.links:
            self._spawn(link)
        async with asyncio.timeout(15):
            await asyncio.gather(*(link.ready.wait() for link in self.links))
        self._sync = supervise.spawn("workers", self._sync_loop)
        log.info("workers.started", pids=[link.pid for link in self.links])

    def _spawn(self, link: Link) -> None:
        ours, theirs = ipc.pair()
        link.ready.clear()
        link.exited.clear()
        link.chan = ipc.Channel(ours, partial(self._message, link), _nothing)
        self.zchan.send("spawn", link.index, [theirs.fileno()])
        theirs.close()

    def _zygote_message(self, kind: str, payload: Any, fds: list[int]) -> None:
        if kind == "spawned":
            index, pid = payload
            self.links[index].pid = pid
        elif kind == "exited":
            index, pid, code = payload
            if 0 <= index < len(self.links):
                self._exited(self.links[index], pid, code)

    def _zygote_gone(self) -> None:
        if not self.stopping:
            log.error("workers.fork_server_gone", detail="no worker can be replaced now")

    def _exited(self, link: Link, pid: int, code: int) -> None:
        if link.chan is not None:
            link.chan.read_pending()  # its last counters and its "stopped"
            link.chan.close()
            link.chan = None
        link.exited.set()
        self.merger.forget(link.index)
        link.counts = {}
        if self.stopping or link.stopped:
            return
        metrics.internal_errors.labels("worker").inc()
        wait = min(RESTART_FIRST * 2 ** link.restarts, RESTART_MAX)
        link.restarts += 1
        log.error("workers.exited", worker=link.index, pid=pid, code=code,
                  restart_in=round(wait, 3))
        self.loop.call_later(wait, self._respawn, link)

    def _respawn(self, link: Link) -> None:
        if not self.stopping:
            self._spawn(link)

    def _message(self, link: Link, kind: str, payload: Any, fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        if kind == "ready":
            self._introduce(link)
            link.ready.set()
        elif kind == "metrics":
            snap, counts = payload
            self.merger.apply(link.index, snap)
            link.counts = counts
        elif kind == "passive":
            name, backend, reason, detail = payload
            lst = self.listeners().get(name)
            b = next((b for b in lst.pool.backends if b.name == backend), None) if lst else None
            if b is not None:
                b.passive_failure(reason, detail)
        elif kind == "stopped":
            link.stopped = True
            link.cut = int(payload)
            log.debug("workers.stopped", worker=link.index, cut=link.cut)

    def _introduce(self, link: Link) -> None:
        """Everything a new worker needs, in order."""
        assert link.chan is not None
        link.chan.send("log", self.log_cfg)
        for name, lst in self.listeners().items():
            link.chan.send("listener", (lst.cfg, lst.hostname),
                           [s.fileno() for s in lst.gate.socks])
            link.chan.send("backends", (name, self._table(lst)))
            if self.accepting.get(name):
                link.chan.send("accept", (name, True))

    # --- what workers are told --------------------------------------------------------------

    def _broadcast(self, kind: str, payload: Any = None) -> None:
        for link in self.links:
            if link.chan is not None and link.ready.is_set():
                link.chan.send(kind, payload)

    @staticmethod
    def _table(lst: Listener) -> Table:
        return [(b.name, b.sockaddr, b.greeting.seconds, b.available)
                for b in lst.pool.backends]

    def listening(self, name: str, on: bool) -> None:
        """The gate of `name` started or stopped listening."""
        self.accepting[name] = on
        if on:
            self.backends_changed(name)  # fresh verdicts first
        self._broadcast("accept", (name, on))

    def backends_changed(self, name: str) -> None:
        lst = self.listeners().get(name)
        if lst is None:
            return
        table = self._table(lst)
        if table != self.tables.get(name):
            self.tables[name] = table
            self._broadcast("backends", (name, table))

    async def _sync_loop(self) -> None:
        """Greeting deadlines move with every probe: pushed when they change, at most
        every 0.25 s (verdicts go at once through backends_changed)."""
        while True:
            await asyncio.sleep(0.25)
            for name in list(self.listeners()):
                self.backends_changed(name)

    def added(self, lst: Listener) -> None:
        for link in self.links:
            if link.chan is not None and link.ready.is_set():
                link.chan.send("listener", (lst.cfg, lst.hostname),
                               [s.fileno() for s in lst.gate.socks])
        self.backends_changed(lst.cfg.name)

    def reconfigured(self, lst: Listener) -> None:
        self._broadcast("config", (lst.cfg, lst.hostname))
        self.backends_changed(lst.cfg.name)

    def removed(self, name: str) -> None:
        self._broadcast("drop", name)
        self.tables.pop(name, None)
        self.accepting.pop(name, None)

    def log_changed(self, fmt: str, level: str) -> None:
        self.log_cfg = (fmt, level)
        self._broadcast("log", self.log_cfg)

    # --- for /status ------------------------------------------------------------------------

    def counts(self, name: str) -> tuple[int, int]:
        """(relayed, waiting) connections of listener `name` in the workers."""
        active = waiting = 0
        for link in self.links:
            a, w, _ = link.counts.get(name, (0, 0, {}))
            active, waiting = active + a, waiting + w
        return active, waiting

    def by_backend(self, name: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for link in self.links:
            for b, n in link.counts.get(name, (0, 0, {}))[2].items():
                out[b] = out.get(b, 0) + n
        return out

    def status(self) -> list[dict[str, Any]]:
        return [{"index": link.index, "pid": link.pid, "alive": not link.exited.is_set(),
                 "restarts": link.restarts,
                 "connections_active": sum(c[0] for c in link.counts.values())}
                for link in self.links]

    # --- stop ---------------------------------------------------------------------------------

    def cut(self) -> None:
        self._broadcast("cut")

    async def stop(self, timeout: float) -> int:
        """Workers finish their connections for up to `timeout`, then exit; returns how
        many connections they had to cut."""
        self.stopping = True
        await supervise.cancel(self._sync)
        self._broadcast("stop", timeout)
        try:
            async with asyncio.timeout(timeout + 5):
                await asyncio.gather(*(link.exited.wait() for link in self.links
                                       if link.pid))
        except TimeoutError:
            log.error("workers.stop_timeout", detail="killing what is left")
        self.zchan.close()
        self.zygote.stop()
        return sum(link.cut for link in self.links)
