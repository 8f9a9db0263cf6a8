"""Backends and their health: the single owner of "is this backend up?".

Each Backend runs its own prober task and applies rise/fall hysteresis.  Real traffic reports
failures here too (passive health), which both counts as a failed probe and wakes the prober
at once, so a dead backend is confirmed in milliseconds rather than one interval later.
The Pool keeps the ordered list (local first, then peers by priority) and tells its
subscribers (the gate) when the aggregate changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from ..config.model import BackendConfig, Endpoint, ProbeConfig
from ..ops.metrics import BackendMetrics
from .probe import ProbeResult, probe

log = structlog.get_logger("forwarder.backends")

HISTORY = 20


def numeric_sockaddr(ep: Endpoint) -> tuple[socket.AddressFamily, tuple[Any, ...]] | None:
    """(family, sockaddr) for an address literal, computed once instead of a getaddrinfo
    per connection."""
    try:
        infos = socket.getaddrinfo(ep.host, ep.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
    except socket.gaierror:
        return None
    return infos[0][0], infos[0][4]


class Backend:
    def __init__(self, cfg: BackendConfig, probe_cfg: ProbeConfig, on_change: Callable[[], None],
                 send_proxy: str | None = None, source: str = "static") -> None:
        self.cfg = cfg
        self.endpoint: Endpoint = cfg.endpoint
        self.sockaddr = numeric_sockaddr(cfg.endpoint)  # None: a name, resolved per connect
        self.name = cfg.name
        self.probe_cfg = probe_cfg
        self.send_proxy = send_proxy
        self.source = source
        self.up = False
        self._ok = 0
        self._fail = 0
        self.history: deque[ProbeResult] = deque(maxlen=HISTORY)
        self.metrics = BackendMetrics(self.name)
        self._on_change = on_change
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.last_change: float | None = None

    @property
    def pending(self) -> bool:
        """A rise or fall has started but is not confirmed yet."""
        return (self._ok > 0) if not self.up else (self._fail > 0)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"probe {self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.metrics.up.set(0)

    def reconfigure(self, probe_cfg: ProbeConfig, send_proxy: str | None) -> None:
        self.probe_cfg = probe_cfg
        self.send_proxy = send_proxy
        self._wake.set()

    def passive_failure(self, reason: str, detail: str = "") -> None:
        """Real traffic failed on this backend: count it and re-probe now."""
        self.metrics.passive[reason].inc()
        log.warning("backend.passive_failure", backend=self.name, reason=reason, detail=detail)
        self._record(False)
        self._wake.set()

    def _record(self, ok: bool) -> None:
        if ok:
            self._ok += 1
            self._fail = 0
            if not self.up and self._ok >= self.probe_cfg.rise:
                self._set(True)
        else:
            self._fail += 1
            self._ok = 0
            if self.up and self._fail >= self.probe_cfg.fall:
                self._set(False)

    def _set(self, up: bool) -> None:
        self.up = up
        self.last_change = asyncio.get_running_loop().time()
        self.metrics.transition(up)
        last = self.history[-1].detail if self.history else ""
        log.info("backend.state", backend=self.name, state="up" if up else "down", last=last)
        self._on_change()

    async def _run(self) -> None:
        while True:
            p = self.probe_cfg
            res = await probe(p.kind, self.endpoint, p.timeout, self.send_proxy)
            self.history.append(res)
            self.metrics.probe[res.result].inc()
            self.metrics.probe_duration.observe(res.duration)
            if not res.ok:
                # the first failure of a run is news; the rest of the run is debug noise
                (log.warning if self._fail == 0 else log.debug)(
                    "probe.failed", backend=self.name, kind=p.kind, result=res.result,
                    detail=res.detail, duration=round(res.duration, 4))
            self._record(res.ok)
            if len(self.history) == 1 and not res.ok:
                self._on_change()  # a first failure is a verdict even without a transition
            wait = p.fast_interval if self.pending else p.interval
            wait *= 1 + random.uniform(-p.jitter, p.jitter)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

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
    """The ordered backends of one listener."""

    def __init__(self, listener: str, configs: Iterable[BackendConfig], probe_cfg: ProbeConfig,
                 send_proxy: str | None = None) -> None:
        self.listener = listener
        self.probe_cfg = probe_cfg
        self.send_proxy = send_proxy
        self._subscribers: list[Callable[[], None]] = []
        self.backends: list[Backend] = [self._make(c) for c in configs]
        self._running = False

    def _make(self, c: BackendConfig, source: str = "static") -> Backend:
        return Backend(c, c.probe or self.probe_cfg, self._changed, self.send_proxy, source)

    def subscribe(self, fn: Callable[[], None]) -> None:
        self._subscribers.append(fn)

    def _changed(self) -> None:
        for fn in self._subscribers:
            fn()

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

    async def update(self, configs: Iterable[BackendConfig], probe_cfg: ProbeConfig,
                     send_proxy: str | None, source: str = "static") -> None:
        """Replace the backends of one source (static config or DNS), keeping the health
        state of those that stay."""
        self.probe_cfg = probe_cfg
        self.send_proxy = send_proxy
        wanted = {c.endpoint: c for c in configs}
        keep: list[Backend] = []
        gone: list[Backend] = []
        for b in self.backends:
            if b.source != source:
                keep.append(b)
            elif b.endpoint in wanted:
                c = wanted.pop(b.endpoint)
                b.cfg = c
                b.reconfigure(c.probe or probe_cfg, send_proxy)
                keep.append(b)
            else:
                gone.append(b)
        for c in wanted.values():
            nb = self._make(c, source)
            keep.append(nb)
            if self._running:
                nb.start()
        keep.sort(key=lambda b: (not b.cfg.local, b.cfg.priority))
        self.backends = keep
        for b in gone:
            await b.stop()
            log.info("backend.removed", listener=self.listener, backend=b.name, source=source)
        self._changed()
