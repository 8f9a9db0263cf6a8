"""Wiring and lifecycle: bind (or adopt systemd's sockets), drop privileges, run listeners,
handle signals.

Signal handlers only enqueue; the loop does the work (uvicorn's handle_exit habit).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import structlog

from . import __version__
from .config.model import Config, ConfigError, ListenerConfig
from .ops import system
from .traffic.listener import Listener

log = structlog.get_logger("forwarder.service")

Reloader = Callable[[], Config]


def bind_all(cfg: Config, activated: list[socket.socket]) -> dict[str, list[socket.socket]]:
    """Sockets for every listener: systemd's where they match (by address or by
    LISTEN_FDNAMES = listener name), our own bind otherwise."""
    out: dict[str, list[socket.socket]] = {}
    pool = list(activated)
    try:
        for lc in cfg.listeners:
            socks: list[socket.socket] = []
            for ep in lc.endpoints:
                match = next((s for s in pool if _same_addr(s, ep.host, ep.port)), None)
                if match is None:
                    match = next((s for s in pool if getattr(s, "fd_name", "") == lc.name), None)
                if match is not None:
                    pool.remove(match)
                    socks.append(match)
                else:
                    socks.append(system.bind(ep, reuse_port=lc.reuse_port))
            out[lc.name] = socks
    except Exception:
        for socks in out.values():
            for s in socks:
                if s not in activated:
                    s.close()
        raise
    for s in pool:
        log.warning("activation.unused_socket", fd=s.fileno(), address=_addr(s))
    return out


def _addr(s: socket.socket) -> str:
    try:
        a = s.getsockname()
        return f"{a[0]}:{a[1]}"
    except OSError:
        return "?"


def _same_addr(s: socket.socket, host: str, port: int) -> bool:
    try:
        a = s.getsockname()
    except OSError:
        return False
    try:
        want = socket.getaddrinfo(host, port, s.family, socket.SOCK_STREAM,
                                  flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
    except socket.gaierror:
        return False
    return any(w[4][:2] == a[:2] for w in want)


def cli_listener_for_activation(cfg: Config, activated: list[socket.socket]) -> Config:
    """`forwarder --backend X` under systemd-socket-activate: one listener on all passed fds."""
    lc = cfg.listeners[0]
    addrs = []
    port = lc.port
    for s in activated:
        a = s.getsockname()
        addrs.append(a[0])
        port = a[1]
    return replace(cfg, listeners=(replace(lc, addresses=tuple(addrs), port=port),))


class Service:
    def __init__(self, cfg: Config, socks: dict[str, list[socket.socket]], *,
                 reloader: Reloader | None = None, activated: bool = False,
                 admin_sock: socket.socket | None = None) -> None:
        self.cfg = cfg
        self.socks = socks
        self.admin_sock = admin_sock
        self.reloader = reloader
        self.activated = activated
        self.listeners: dict[str, Listener] = {}
        self.hostname = socket.getfqdn()
        self._events: asyncio.Queue[str] = asyncio.Queue()
        self.ready = asyncio.Event()
        self.extras: list[Callable[[], Awaitable[None]]] = []  # async closers (admin)
        self.discoveries: dict[str, Callable[[], Awaitable[None]]] = {}  # by listener
        self.exit_code = 0

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for lc in self.cfg.listeners:
            self._add_listener(lc, self.socks[lc.name])
        for sig, ev in ((signal.SIGTERM, "stop"), (signal.SIGINT, "stop"),
                        (signal.SIGHUP, "reload")):
            loop.add_signal_handler(sig, self._events.put_nowait, ev)
        await self._start_extras()
        log.info("forwarder.started", version=__version__,
                 listeners=[f"{lc.name}={','.join(map(str, lc.endpoints))}"
                            for lc in self.cfg.listeners],
                 loop=type(loop).__module__.split(".")[0])
        system.sd_notify("READY=1\nSTATUS=probing backends")
        self.ready.set()
        wd = system.watchdog_interval()
        wd_task = loop.create_task(self._watchdog(wd), name="watchdog") if wd else None
        while True:
            ev = await self._events.get()
            if ev == "stop":
                break
            if ev == "reload":
                await self.reload()
        if wd_task:
            wd_task.cancel()
        await self.shutdown()
        return self.exit_code

    async def _start_extras(self) -> None:
        """Admin endpoint and DNS discovery: each returns an async closer."""
        from .ops import admin

        if self.admin_sock is not None:
            self.extras.append(await admin.start(self.admin_sock, self))
        self._sync_discovery()

    def _sync_discovery(self) -> None:
        """One DNS discovery task per listener that asks for it (also after a reload)."""
        from .health import discovery

        for name, lst in self.listeners.items():
            if lst.cfg.discovery is not None and name not in self.discoveries:
                self.discoveries[name] = discovery.start(lst)

    def stop(self) -> None:
        self._events.put_nowait("stop")

    def _add_listener(self, lc: ListenerConfig, socks: list[socket.socket]) -> Listener:
        lst = Listener(lc, socks, self.hostname)
        self.listeners[lc.name] = lst
        lst.start()
        return lst

    async def _watchdog(self, interval: float) -> None:
        while True:
            system.sd_notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def reload(self) -> None:
        if self.reloader is None:
            log.warning("reload.unsupported", detail="no config file to re-read")
            return
        system.sd_notify("RELOADING=1")
        try:
            new = self.reloader()
        except ConfigError as e:
            log.error("reload.failed", error=str(e), detail="keeping the running config")
            system.sd_notify("READY=1")
            return
        for lc in new.listeners:
            cur = self.listeners.get(lc.name)
            if cur is None:
                try:
                    socks = bind_all(replace(new, listeners=(lc,)), [])[lc.name]
                except system.SystemError_ as e:
                    log.error("reload.needs_restart", listener=lc.name, error=str(e))
                    continue
                self._add_listener(lc, socks)
                log.info("reload.listener_added", listener=lc.name)
                continue
            if set(lc.endpoints) != set(cur.cfg.endpoints):
                log.error("reload.needs_restart", listener=lc.name,
                          detail="listen addresses changed; a new bind needs a restart",
                          old=[str(e) for e in cur.cfg.endpoints],
                          new=[str(e) for e in lc.endpoints])
                lc = replace(lc, addresses=cur.cfg.addresses, port=cur.cfg.port)
            try:
                await cur.reconfigure(lc)
            except ConfigError as e:
                log.error("reload.failed", listener=lc.name, error=str(e))
        names = {lc.name for lc in new.listeners}
        for name in [n for n in self.listeners if n not in names]:
            lst = self.listeners.pop(name)
            log.info("reload.listener_removed", listener=name)
            asyncio.get_running_loop().create_task(self._retire(lst))
        for name in [n for n, lst in self.listeners.items() if lst.cfg.discovery is None]:
            if name in self.discoveries:
                await self.discoveries.pop(name)()
                lst = self.listeners[name]
                await lst.pool.update([], lst.cfg.probe, lst.cfg.send_proxy, source="dns")
                log.info("dns.disabled", listener=name)
        self._sync_discovery()
        self.cfg = replace(new, listeners=tuple(lst.cfg for lst in self.listeners.values()))
        log.info("reload.done", listeners=sorted(self.listeners))
        system.sd_notify("READY=1")

    async def _retire(self, lst: Listener) -> None:
        stop_dns = self.discoveries.pop(lst.cfg.name, None)
        if stop_dns is not None:
            await stop_dns()
        await lst.stop(self.cfg.drain_timeout)
        for s in lst.gate.socks:
            s.close()

    async def shutdown(self) -> None:
        system.sd_notify("STOPPING=1")
        log.info("forwarder.stopping", drain_timeout=self.cfg.drain_timeout,
                 active=sum(len(lst.splices) for lst in self.listeners.values()))
        cut = await asyncio.gather(*(lst.stop(self.cfg.drain_timeout)
                                     for lst in self.listeners.values()))
        for closer in [*self.extras, *self.discoveries.values()]:
            await closer()
        for lst in self.listeners.values():
            for s in lst.gate.socks:
                if self.activated:
                    # systemd's socket: hand it back listening, so it queues for the next us
                    with contextlib.suppress(OSError):
                        s.listen(lst.cfg.backlog)
                s.close()
        log.info("forwarder.stopped", cut=sum(cut))

    # --- for the admin endpoint ---------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """For /status: also the task and fd counts, so leaks are visible from outside."""
        try:
            fds = len(os.listdir("/proc/self/fd"))
        except OSError:
            fds = -1
        return {"version": __version__, "pid": os.getpid(),
                "tasks": len(asyncio.all_tasks()), "fds": fds,
                "listeners": [lst.status() for lst in self.listeners.values()]}

    def readiness(self) -> list[str]:
        """Why this forwarder is not ready, one line per listener whose gate is not open
        ([] when every gate is open): for /readyz."""
        return [f"{lst.cfg.name}: gate closed ({lst.gate.reason})"
                for lst in self.listeners.values() if not lst.gate.is_open]

    def drain(self, name: str | None = None) -> list[str]:
        out = []
        for lst in self.listeners.values():
            if name in (None, lst.cfg.name):
                lst.gate.drain()
                out.append(lst.cfg.name)
        return out

    def resume(self, name: str | None = None) -> list[str]:
        out = []
        for lst in self.listeners.values():
            if name in (None, lst.cfg.name):
                lst.gate.resume()
                out.append(lst.cfg.name)
        return out
