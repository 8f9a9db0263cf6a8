"""Wiring and lifecycle: listeners on the sockets bound before the privilege drop, the
admin endpoint, signals, reload.

Signal handlers only enqueue; the loop does the work (uvicorn's handle_exit habit).  The
first SIGTERM/SIGINT drains (gates closed, live splices get `drain_timeout`); a second one
while draining resets what is left and exits 1, as uvicorn's does.  A reload re-reads the
config in a thread (the load step resolves host names, which blocks) and applies it
without touching live splices; what it cannot apply is logged as `reload.needs_restart`,
naming each key.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import structlog

from . import __version__
from .config.checks import is_own_address, limited
from .config.model import Config, ConfigError, Endpoint, ListenerConfig, SockAddr
from .net.sockets import local_addresses
from .ops import admin, history, logs, supervise, system
from .ops.state import State, state_path
from .traffic.listener import Listener
from .workers.hub import Hub
from .workers.zygote import Zygote

log = structlog.get_logger("forwarder.service")

Reloader = Callable[[], Config]
Closer = Callable[[], Awaitable[None]]


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


# the top-level keys a running process cannot change (it has dropped its privileges)
RESTART_KEYS = ("user", "group")


class Service:
    def __init__(self, cfg: Config, socks: dict[str, list[socket.socket]], *,
                 reloader: Reloader | None = None, activated: list[socket.socket] | None = None,
                 admin_sock: socket.socket | None = None, zygote: Zygote | None = None,
                 workers: int = 1) -> None:
        self.cfg = cfg
        self.zygote = zygote
        self.worker_count = workers
        self.hub: Hub | None = None
        self.socks = socks
        self.reloader = reloader
        self.activated = activated or []
        self.admin_sock = admin_sock
        self.listeners: dict[str, Listener] = {}
        self.hostname = system.hostname()
        self._events: asyncio.Queue[str] = asyncio.Queue()
        self.ready = asyncio.Event()
        self._admin_stop: Closer | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._local = local_addresses()
        self.state = State(state_path(cfg))
        self.exit_code = 0

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for w in self.cfg.warnings:
            log.warning("config.warning", detail=w)
        if self.zygote is not None:
            self.hub = Hub(self.zygote, self.worker_count, lambda: self.listeners,
                           (self.cfg.log.format, self.cfg.log.level))
        for lc in self.cfg.listeners:
            await self._add_listener(lc, self.socks[lc.name])
        if self.hub is not None:
            await self.hub.start()
        for sig, ev in ((signal.SIGTERM, "stop"), (signal.SIGINT, "stop"),
                        (signal.SIGHUP, "reload")):
            loop.add_signal_handler(sig, self._events.put_nowait, ev)
        if self.admin_sock is not None:
            self._admin_stop = await admin.start(self.admin_sock, self,
                                                 dashboard_url=self.cfg.dashboard_url)
        history.record("forwarder.started", listeners=sorted(self.listeners))
        log.info("forwarder.started", version=__version__,
                 listeners=[f"{lc.name}={','.join(map(str, lc.endpoints))}"
                            for lc in self.cfg.listeners],
                 loop=type(loop).__module__.split(".")[0])
        system.sd_notify("READY=1\nSTATUS=probing backends")
        self.ready.set()
        supervise.settle()
        wd = system.watchdog_interval()
        if wd:
            self._watchdog = supervise.spawn("watchdog", _pinger(wd))
        while await self._events.get() != "stop":
            await self.reload()
        await self._shutdown_or_force()
        return self.exit_code

    def stop(self) -> None:
        self._events.put_nowait("stop")

    def _own(self, sockaddr: tuple[Any, ...]) -> bool:
        listens = [ep for lst in self.listeners.values() for ep in lst.cfg.endpoints]
        return is_own_address(sockaddr, listens, self._local)

    def _own_sa(self, sa: SockAddr) -> bool:
        return self._own(sa[1])

    async def _add_listener(self, lc: ListenerConfig, socks: list[socket.socket]) -> None:
        lst = Listener(lc, socks, self.hostname, own=self._own_sa, activated=self.activated)
        if self.hub is not None:
            lst.use_workers(self.hub)
        self.listeners[lc.name] = lst
        if lc.name in self.state.drained:  # before the first probe can open the gate
            lst.gate.drain()
            log.info("state.drain_restored", listener=lc.name, state_file=self.state.path)
        await lst.start()

    # --- reload ---------------------------------------------------------------------------

    async def reload(self) -> None:
        if self.reloader is None:
            log.warning("reload.unsupported", detail="no config file to re-read")
            return
        system.sd_notify("RELOADING=1")
        try:
            new = await asyncio.get_running_loop().run_in_executor(None, self.reloader)
        except ConfigError as e:
            log.error("reload.failed", error=str(e), detail="keeping the running config")
            history.record("reload.failed", reason=str(e))
            system.sd_notify("READY=1")
            return
        if self.hub is not None and limited(new):
            log.error("reload.failed", error=f"listener {limited(new)[0]!r} now has "
                      "instances, per_source or cps limits, which worker processes cannot "
                      "share", detail="keeping the running config; set workers = 1 and "
                                      "restart")
            system.sd_notify("READY=1")
            return
        changed = [k for k in RESTART_KEYS if getattr(new, k) != getattr(self.cfg, k)]
        if changed:
            log.error("reload.needs_restart", keys=changed,
                      detail="the process dropped its privileges at start; restart to apply")
        if new.log != self.cfg.log:
            logs.setup(new.log.format, new.log.level)
            log.info("reload.log", format=new.log.format, level=new.log.level)
            if self.hub is not None:
                self.hub.log_changed(new.log.format, new.log.level)
        if new.workers != self.cfg.workers:
            log.error("reload.needs_restart", keys=["workers"],
                      detail="the number of worker processes is set at start")
        for w in new.warnings:
            log.warning("config.warning", detail=w)
        admin_ep = await self._reload_admin(new.admin)
        for lc in new.listeners:
            cur = self.listeners.get(lc.name)
            if cur is None:
                try:
                    socks = bind_all(replace(new, listeners=(lc,)), [])[lc.name]
                except system.SystemError_ as e:
                    log.error("reload.needs_restart", listener=lc.name, keys=["listener"],
                              error=str(e))
                    continue
                await self._add_listener(lc, socks)
                if self.hub is not None:
                    self.hub.added(self.listeners[lc.name])
                log.info("reload.listener_added", listener=lc.name)
                continue
            if set(lc.endpoints) != set(cur.cfg.endpoints):
                log.error("reload.needs_restart", listener=lc.name, keys=["addresses", "port"],
                          detail="listen addresses changed; a new bind needs a restart",
                          old=[str(e) for e in cur.cfg.endpoints],
                          new=[str(e) for e in lc.endpoints])
                lc = replace(lc, addresses=cur.cfg.addresses, port=cur.cfg.port)
            await cur.reconfigure(lc)
            if self.hub is not None:
                self.hub.reconfigured(cur)
        names = {lc.name for lc in new.listeners}
        for name in [n for n in self.listeners if n not in names]:
            lst = self.listeners.pop(name)
            if self.hub is not None:
                self.hub.removed(name)
            log.info("reload.listener_removed", listener=name)
            asyncio.get_running_loop().create_task(lst.stop(new.drain_timeout),
                                                   name=f"retire {name}")
        self.cfg = replace(new, admin=admin_ep, user=self.cfg.user, group=self.cfg.group,
                           workers=self.cfg.workers,
                           listeners=tuple(lst.cfg for lst in self.listeners.values()))
        log.info("reload.done", listeners=sorted(self.listeners))
        history.record("reload.done", listeners=sorted(self.listeners))
        system.sd_notify("READY=1")

    async def _reload_admin(self, ep: Endpoint | None) -> Endpoint | None:
        """A new admin address is bound now (after the drop: a port below 1024 fails and the
        old endpoint stays); None turns the admin endpoint off."""
        if ep == self.cfg.admin:
            return ep
        sock = None
        if ep is not None:
            try:
                sock = system.bind(ep, claim=False)
            except system.SystemError_ as e:
                log.error("reload.needs_restart", keys=["admin"], error=str(e),
                          detail="keeping the admin endpoint at "
                                 f"{self.cfg.admin or 'none'}")
                return self.cfg.admin
        if self._admin_stop is not None:
            await self._admin_stop()
            self._admin_stop = None
        if sock is not None:
            self._admin_stop = await admin.start(sock, self, dashboard_url=self.cfg.dashboard_url)
        log.info("reload.admin", address=str(ep) if ep else None)
        return ep

    # --- shutdown -------------------------------------------------------------------------

    async def _shutdown_or_force(self) -> None:
        """Drain; a second stop signal meanwhile cuts everything and exits 1."""
        loop = asyncio.get_running_loop()
        shutdown = loop.create_task(self.shutdown(), name="shutdown")
        while not shutdown.done():
            nxt = loop.create_task(self._events.get())
            await asyncio.wait({shutdown, nxt}, return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                nxt.cancel()
            elif nxt.result() == "stop" and self.exit_code == 0:
                self.exit_code = 1
                live = sum(lst.active for lst in self.listeners.values())
                log.warning("forwarder.forced_exit", cut=live,
                            detail="second stop signal: live connections reset")
                for lst in self.listeners.values():
                    lst.cut()
                if self.hub is not None:
                    self.hub.cut()
        await shutdown

    async def shutdown(self) -> None:
        system.sd_notify("STOPPING=1")
        log.info("forwarder.stopping", drain_timeout=self.cfg.drain_timeout,
                 active=sum(lst.active for lst in self.listeners.values()))
        if self._watchdog is not None:
            self._watchdog.cancel()
        stops = [lst.stop(self.cfg.drain_timeout) for lst in self.listeners.values()]
        if self.hub is not None:  # the workers drain at the same time
            stops.append(self.hub.stop(self.cfg.drain_timeout))
        cut = await asyncio.gather(*stops)
        if self._admin_stop is not None:
            await self._admin_stop()
        log.info("forwarder.stopped", cut=sum(cut))

    # --- for the admin endpoint (admin.Controls) ------------------------------------------

    def status(self) -> dict[str, Any]:
        """For /status: also the task and fd counts, so leaks are visible from outside."""
        try:
            fds = len(os.listdir("/proc/self/fd"))
        except OSError:
            fds = -1
        return {"version": __version__, "pid": os.getpid(),
                "tasks": len(asyncio.all_tasks()), "fds": fds,
                "workers": self.hub.status() if self.hub is not None else [],
                "listeners": [lst.status() for lst in self.listeners.values()]}

    def readiness(self) -> list[str]:
        """Why this forwarder is not ready, one line per listener whose gate is not open
        ([] when every gate is open): for /readyz."""
        out = []
        for lst in self.listeners.values():
            g = lst.gate
            if g.is_open:
                continue
            why = f"{lst.cfg.name}: gate closed ({g.reason})"
            if g.open_error is not None:
                e = g.open_error
                why += (f": listen() on {e['address']} failed: {e['error']}"
                        f"{' (held by ' + e['holder'] + ')' if e['holder'] else ''}, "
                        f"retrying")
            out.append(why)
        return out

    def drain(self, name: str | None = None) -> list[str]:
        """Close the gate of `name` (None: every listener) for maintenance; kept in the
        state file, so a restart during maintenance does not reopen the port."""
        done = self._each(name, lambda lst: lst.gate.drain())
        self.state.set_drained(self.state.drained | set(done))
        history.record("drain", listeners=done, reason="operator")
        return done

    def resume(self, name: str | None = None) -> list[str]:
        done = self._each(name, lambda lst: lst.gate.resume())
        self.state.set_drained(self.state.drained - set(done))
        history.record("resume", listeners=done, reason="operator")
        return done

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        """For /events: the recent history (ops/history.py)."""
        return history.recent(since=since)

    def _each(self, name: str | None, fn: Callable[[Listener], None]) -> list[str]:
        done = [lst for lst in self.listeners.values() if name in (None, lst.cfg.name)]
        for lst in done:
            fn(lst)
        return [lst.cfg.name for lst in done]


def _pinger(interval: float) -> Callable[[], Awaitable[None]]:
    async def ping() -> None:
        while True:
            system.sd_notify("WATCHDOG=1")
            await asyncio.sleep(interval)
    return ping
