"""Backends and their health: the single owner of "is this backend up?".

Each Backend runs its own prober (a supervised task) and applies rise/fall hysteresis
(rise_fall.py).  Real traffic reports failures here too (passive health), which both counts
as a failed probe and wakes the prober at once, so a dead backend is confirmed in
milliseconds rather than one interval later.

The Pool keeps the ordered list (local first, then peers by priority), the probe defaults
it was given, and tells its subscribers (the listener, which tells the gate) when a verdict
changes.  A subscriber that raises is logged and counted, never allowed to stop the prober
that delivered the news: the first build lost its prober for good that way.  A backend
whose address is one of our own listening addresses is never added: a forwarder relaying
to itself would loop until it runs out of file descriptors.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import structlog

from ..config.model import BackendConfig, Endpoint, ProbeConfig, SockAddr
from ..ops import supervise
from ..ops.metrics import BackendMetrics
from .probe import ProbeResult, probe
from .rise_fall import RiseFall

log = structlog.get_logger("forwarder.backends")

HISTORY = 20
Listener = Callable[["Backend"], None]


def sockaddr_of(ep: Endpoint) -> SockAddr | None:
    """(family, sockaddr) of an address literal; None for a host name."""
    try:
        infos = socket.getaddrinfo(ep.host, ep.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
    except socket.gaierror:
        return None
    return infos[0][0], infos[0][4]


class Backend:
    def __init__(self, cfg: BackendConfig, probe_cfg: ProbeConfig, on_change: Listener,
                 send_proxy: str | None, source: str, sockaddr: SockAddr) -> None:
        self.cfg = cfg
        self.endpoint: Endpoint = cfg.endpoint
        self.sockaddr = sockaddr
        self.name = cfg.name
        self.probe_cfg = probe_cfg
        self.send_proxy = send_proxy
        self.source = source
        self.health = RiseFall(probe_cfg.rise, probe_cfg.fall)
        self.history: deque[ProbeResult] = deque(maxlen=HISTORY)
        self.metrics = BackendMetrics(self.name)
        self._on_change = on_change
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.last_change: float | None = None

    @property
    def up(self) -> bool:
        return self.health.up

    def start(self) -> None:
        if self._task is None:
            self._task = supervise.spawn("probe", self._run, name=self.name)

    async def stop(self) -> None:
        await supervise.cancel(self._task)
        self._task = None
        self.metrics.up.set(0)

    def reconfigure(self, cfg: BackendConfig, probe_cfg: ProbeConfig,
                    send_proxy: str | None) -> None:
        self.cfg = cfg
        if cfg.sockaddr is not None:  # a host name may resolve elsewhere after a reload
            self.sockaddr = cfg.sockaddr
        self.probe_cfg = probe_cfg
        self.health.rise, self.health.fall = probe_cfg.rise, probe_cfg.fall
        self.send_proxy = send_proxy
        self._wake.set()

    # --- what traffic reports -------------------------------------------------------------

    def passive_failure(self, reason: str, detail: str = "") -> None:
        """Real traffic failed on this backend: count it and re-probe now."""
        self.metrics.passive[reason].inc()
        log.warning("backend.passive_failure", backend=self.name, reason=reason, detail=detail)
        self._record(False)
        self._wake.set()

    def connect_time(self, seconds: float) -> None:
        self.metrics.connect.observe(seconds)

    # --- the verdict ----------------------------------------------------------------------

    def _record(self, ok: bool) -> None:
        if self.health.record(ok):
            self.last_change = asyncio.get_running_loop().time()
            up = self.health.up
            self.metrics.transition(up)
            last = self.history[-1].detail if self.history else ""
            log.info("backend.state", backend=self.name, state="up" if up else "down",
                     last=last)
            self._on_change(self)

    async def _run(self) -> None:
        while True:
            p = self.probe_cfg
            res = await probe(p.kind, self.endpoint, p.timeout, self.send_proxy)
            self.history.append(res)
            self.metrics.probe[res.result].inc()
            self.metrics.probe_duration.observe(res.duration)
            if not res.ok:
                # the first failure of a run is news; the rest of the run is debug noise
                (log.warning if self.health.fails == 0 else log.debug)(
                    "probe.failed", backend=self.name, kind=p.kind, result=res.result,
                    detail=res.detail, duration=round(res.duration, 4))
            first = len(self.history) == 1
            self._record(res.ok)
            if first and not res.ok:
                self._on_change(self)  # a first failure is a verdict without a transition
            wait = p.fast_interval if self.health.pending else p.interval
            wait *= 1 + random.uniform(-p.jitter, p.jitter)
            self._wake.clear()
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name, "up": self.up, "local": self.cfg.local,
            "priority": self.cfg.priority, "source": self.source,
            "probe": {"kind": self.probe_cfg.kind, "interval": self.probe_cfg.interval},
            "history": [{"ok": r.ok, "result": r.result, "detail": r.detail,
                         "duration": round(r.duration, 6), "at": r.at}
                        for r in reversed(self.history)],
        }


class Pool:
    """The ordered backends of one listener, from two sources: the config ("static") and
    DNS discovery ("dns")."""

    def __init__(self, listener: str, probe_cfg: ProbeConfig, send_proxy: str | None,
                 own: Callable[[SockAddr], bool]) -> None:
        self.listener = listener
        self.probe_cfg = probe_cfg
        self.send_proxy = send_proxy
        self.is_own = own  # "is this one of our own listening addresses?"
        self._subscribers: list[Listener] = []
        self.backends: list[Backend] = []
        self._running = False

    def configure(self, probe_cfg: ProbeConfig, send_proxy: str | None) -> None:
        """New probe defaults (a reload); applied to the backends by the next update()."""
        self.probe_cfg = probe_cfg
        self.send_proxy = send_proxy

    def subscribe(self, fn: Listener) -> None:
        self._subscribers.append(fn)

    def _changed(self, b: Backend) -> None:
        for fn in self._subscribers:
            try:
                fn(b)
            except Exception:  # the news must not kill the prober that brought it
                supervise.internal_error("gate", "health.subscriber_failed", backend=b.name)

    def start(self) -> None:
        self._running = True
        for b in self.backends:
            b.start()

    async def stop(self) -> None:
        self._running = False
        await asyncio.gather(*(b.stop() for b in self.backends))

    @property
    def local(self) -> Backend | None:
        return next((b for b in self.backends if b.cfg.local), None)

    def local_up(self) -> bool:
        b = self.local
        return b is not None and b.up

    def any_up(self) -> bool:
        return any(b.up for b in self.backends)

    def candidates(self) -> list[Backend]:
        """Live backends, best first (the list is kept sorted)."""
        return [b for b in self.backends if b.up]

    async def update(self, configs: Iterable[BackendConfig], source: str = "static") -> None:
        """Replace the backends of one source, keeping the health of those that stay."""
        wanted: dict[Endpoint, BackendConfig] = {}
        for c in configs:
            if c.sockaddr is None and (sa := sockaddr_of(c.endpoint)) is not None:
                c = replace(c, sockaddr=sa)  # an address literal needs no load step
            if c.sockaddr is None:
                log.error("backend.unresolved", listener=self.listener, backend=c.name)
            elif self.is_own(c.sockaddr):
                log.error("backend.is_self", listener=self.listener, backend=c.name,
                          detail="one of this forwarder's own listening addresses: skipped")
            else:
                wanted[c.endpoint] = c
        keep: list[Backend] = []
        gone: list[Backend] = []
        for b in self.backends:
            if b.source != source:
                keep.append(b)
            elif b.endpoint in wanted:
                c = wanted.pop(b.endpoint)
                b.reconfigure(c, c.probe or self.probe_cfg, self.send_proxy)
                keep.append(b)
            else:
                gone.append(b)
        for c in wanted.values():
            assert c.sockaddr is not None
            nb = Backend(c, c.probe or self.probe_cfg, self._changed, self.send_proxy, source,
                         c.sockaddr)
            keep.append(nb)
            if self._running:
                nb.start()
        keep.sort(key=lambda b: (not b.cfg.local, b.cfg.priority))
        self.backends = keep
        for b in gone:
            await b.stop()
            log.info("backend.removed", listener=self.listener, backend=b.name, source=source)
        if gone:
            self._changed(gone[0])
