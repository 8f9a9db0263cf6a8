"""A worker process: accepts on the listeners' shared sockets and relays, nothing else.

The master owns everything that decides (the gates, the probes and backend health, DNS
discovery, the config, reloads, the admin endpoint); a worker holds read-only replicas of
what it needs, kept current by the master's messages (hub.py), and runs the same
Connections code (hand-off, splice, refusals) as a single process does.  What it learns
that the master must know goes back as messages: a passive failure of a backend, and every
SNAPSHOT_EVERY seconds its counters (ops/metrics.py snapshot; the master exports them).

A worker ignores SIGTERM, SIGINT and SIGHUP: the master decides when it stops (a graceful
stop lets its connections finish), and it dies with the fork server if the master is
killed outright.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from typing import Any

import structlog

from ..config.model import ListenerConfig, SockAddr
from ..net import ipc
from ..ops import logs, metrics, supervise
from ..ops.metrics import ListenerMetrics
from ..traffic.acceptor import Acceptor, Address
from ..traffic.access import Access
from ..traffic.connections import Connections
from ..traffic.poller import Poller
from .zygote import die_with_parent

log = structlog.get_logger("forwarder.worker")

SNAPSHOT_EVERY = 0.25


def _no_hold(reason: str, seconds: float) -> None:
    """cps (which would hold the gate) never runs in a worker: see config/checks.py."""


class Replica:
    """A worker's copy of one backend: what the hand-off needs (handoff.Candidate)."""

    __slots__ = ("available", "connect", "listener", "name", "seconds", "sockaddr", "worker")

    def __init__(self, worker: Worker, listener: str, name: str, sockaddr: SockAddr) -> None:
        self.worker, self.listener, self.name, self.sockaddr = worker, listener, name, sockaddr
        self.seconds = 10.0  # the greeting deadline
        self.available = False
        self.connect = metrics.backend_connect.labels(name)

    @property
    def greeting(self) -> Replica:
        return self

    def passive_failure(self, reason: str, detail: str = "") -> None:
        self.worker.send("passive", (self.listener, self.name, reason, detail))



class WorkerListener:
    def __init__(self, worker: Worker, cfg: ListenerConfig, hostname: str,
                 socks: list[socket.socket]) -> None:
        self.name = cfg.name
        self.socks = socks
        # only_from / no_access, which need no counting across processes (limits that do
        # need one process: config/checks.py keeps them from running with workers)
        self.access = Access(cfg.access, asyncio.get_running_loop().time, _no_hold)
        self.conns = Connections(cfg, hostname, ListenerMetrics(cfg.name), self._release)
        self.replicas: dict[str, Replica] = {}
        self.candidates: list[Replica] = []
        self.acceptor = Acceptor(cfg.name, socks, self._accepted,
                                 exclusive=Poller.for_loop(asyncio.get_running_loop()),
                                 on_not_listening=self._not_listening)
        self.worker = worker
        self.conns.start()

    def configure(self, cfg: ListenerConfig, hostname: str) -> None:
        self.conns.configure(cfg, hostname)
        if cfg.access != self.access.cfg:
            self.access = Access(cfg.access, asyncio.get_running_loop().time, _no_hold)

    def _accepted(self, conn: socket.socket, addr: Address) -> None:
        self.conns.admit(self.access, conn, addr, self.candidates)

    def _release(self, host: str) -> None:
        if not self.access.trivial:
            self.access.release(host)

    def _not_listening(self) -> None:
        """The master shut the socket down before its "accept off" reached us."""
        self.acceptor.off()

    def backends(self, table: list[tuple[str, SockAddr, float, bool]]) -> None:
        """The master's current view, best first: (name, sockaddr, greeting deadline,
        available)."""
        replicas: dict[str, Replica] = {}
        for name, sockaddr, seconds, available in table:
            r = self.replicas.get(name) or Replica(self.worker, self.name, name, sockaddr)
            r.sockaddr, r.seconds = sockaddr, seconds
            was, r.available = r.available, available
            replicas[name] = r
            if was and not available:
                self.conns.release_waiting(r)
        for name, r in self.replicas.items():
            if name not in replicas:
                r.available = False
                self.conns.release_waiting(r)
        self.replicas = replicas
        self.candidates = [r for r in replicas.values() if r.available]

    async def stop(self, timeout: float) -> int:
        self.acceptor.close()
        cut = await self.conns.stop(timeout)
        for s in self.socks:
            s.close()
        return cut


class Worker:
    def __init__(self, sock: socket.socket, index: int) -> None:
        self.index = index
        self.listeners: dict[str, WorkerListener] = {}
        self.done = asyncio.Event()
        self.chan = ipc.Channel(sock, self._message, self.done.set)
        self._stopping: asyncio.Task[None] | None = None

    def send(self, kind: str, payload: Any = None) -> None:
        self.chan.send(kind, payload)

    async def run(self) -> int:
        reporter = supervise.spawn("worker", self._report, name=str(self.index))
        self.send("ready", self.index)
        await self.done.wait()
        await supervise.cancel(reporter)
        self.send("metrics", (metrics.snapshot(), self._counts()))
        self.chan.close()
        return 0

    def _counts(self) -> dict[str, tuple[int, int, dict[str, int]]]:
        return {n: (lst.conns.active, lst.conns.waiting, lst.conns.by_backend())
                for n, lst in self.listeners.items()}

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_EVERY)
            self.send("metrics", (metrics.snapshot(), self._counts()))

    def _message(self, kind: str, payload: Any, fds: list[int]) -> None:
        try:
            self._handle(kind, payload, fds)
        except Exception:
            supervise.internal_error("worker", "worker.message_failed", kind=kind)

    def _handle(self, kind: str, payload: Any, fds: list[int]) -> None:
        if kind == "log":
            fmt, level = payload
            logs.setup(fmt, level)
        elif kind == "listener":  # (cfg, hostname); fds: its listening sockets
            cfg, hostname = payload
            socks = [socket.socket(fileno=fd) for fd in fds]
            for s in socks:
                s.setblocking(False)
            self.listeners[cfg.name] = WorkerListener(self, cfg, hostname, socks)
            supervise.settle()
        elif kind == "config":
            cfg, hostname = payload
            self.listeners[cfg.name].configure(cfg, hostname)
        elif kind == "backends":
            name, table = payload
            self.listeners[name].backends(table)
        elif kind == "accept":
            name, on = payload
            acc = self.listeners[name].acceptor
            acc.on() if on else acc.off()
        elif kind == "drop":
            lst = self.listeners.pop(payload)
            asyncio.get_running_loop().create_task(lst.stop(0))
        elif kind == "cut":
            for lst in self.listeners.values():
                lst.conns.cut()
        elif kind == "stop" and self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop(payload))

    async def _stop(self, timeout: float) -> None:
        cut = await asyncio.gather(*(lst.stop(timeout) for lst in self.listeners.values()))
        self.send("metrics", (metrics.snapshot(), {n: (0, 0, {}) for n in self.listeners}))
        self.send("stopped", sum(cut))
        self.done.set()


def main(fd: int, index: int) -> int:
    """The worker process, forked by the fork server (zygote.py)."""
    die_with_parent()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        import uvloop
        factory: Any = uvloop.new_event_loop
    except ImportError:
        factory = None
    sock = socket.socket(fileno=fd)

    async def go() -> int:
        return await Worker(sock, index).run()

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(go())
