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

from ..config.model import BackendConfig, CheckConfig, Endpoint, ProbeConfig, SockAddr
from ..ops import history, supervise
from ..ops.metrics import BackendMetrics, Buckets
from .greeting import GreetingDeadline
from .probe import ProbeResult, run_check
from .rise_fall import RiseFall

log = structlog.get_logger("forwarder.backends")

HISTORY = 20
Listener = Callable[["Backend"], None]
Greeting = tuple[float | None, float]  # (fixed seconds or None for "auto", ceiling)


def sockaddr_of(ep: Endpoint) -> SockAddr | None:
    """(family, sockaddr) of an address literal; None for a host name."""
    try:
        infos = socket.getaddrinfo(ep.host, ep.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
    except socket.gaierror:
        return None
    return infos[0][0], infos[0][4]


def combine(results: list[tuple[CheckConfig, ProbeResult]]) -> ProbeResult:
    """One probe round: ok only when every check is; the first failure tells why."""
    if len(results) == 1:
        return results[0][1]
    bad = [(c, r) for c, r in results if not r.ok]
    c, r = bad[0] if bad else results[0]
    detail = f"{c.label}: {r.detail}" if bad else "; ".join(
        f"{c.label}: {r.detail}" for c, r in results)
    greeting = next((r.greeting for _, r in results if r.greeting is not None), None)
    return ProbeResult(not bad, r.result, detail, max(r.duration for _, r in results), r.at,
                       greeting=greeting, drain=any(r.drain for _, r in results))


class Backend:
    """One backend's health: probes (every check of a round must pass), rise/fall, passive
    failures, a drain asked for by a check (agent `drain`, http `degraded = "drain"`), and
    its greeting deadline (greeting.py)."""

    def __init__(self, cfg: BackendConfig, probe_cfg: ProbeConfig, on_change: Listener,
                 send_proxy: str | None, source: str, sockaddr: SockAddr,
                 greeting: Greeting = (None, 10.0)) -> None:
        self.cfg = cfg
        self.endpoint: Endpoint = cfg.endpoint
        self.sockaddr = sockaddr
        self.name = cfg.name
        self.probe_cfg = probe_cfg
        self.send_proxy = send_proxy
        self.source = source
        self.health = RiseFall(probe_cfg.rise, probe_cfg.fall)
        self.draining = False  # a check asks for no new connections
        self.available = False  # up and taking new connections (_update_available)
        self.history: deque[ProbeResult] = deque(maxlen=HISTORY)  # rounds
        self.checks: dict[str, deque[ProbeResult]] = {}  # per check label
        self.metrics = BackendMetrics(self.name, tuple(c.label for c in probe_cfg.all_checks))
        self.connect: Buckets = self.metrics.connect  # time until a connection was usable
        self.greeting = GreetingDeadline(*greeting)
        self.metrics.greeting.set(self.greeting.seconds)
        self._on_change = on_change
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.last_change: float | None = None

    @property
    def up(self) -> bool:
        return self.health.up

    def _update_available(self) -> None:
        # an attribute, not a property: Pool.candidates() reads it for every connection
        self.available = self.health.up and not self.draining

    def start(self) -> None:
        if self._task is None:
            self._task = supervise.spawn("probe", self._run, name=self.name)

    async def stop(self) -> None:
        await supervise.cancel(self._task)
        self._task = None
        self.metrics.up.set(0)

    def reconfigure(self, cfg: BackendConfig, probe_cfg: ProbeConfig,
                    send_proxy: str | None, greeting: Greeting = (None, 10.0)) -> None:
        self.cfg = cfg
        if cfg.sockaddr is not None:  # a host name may resolve elsewhere after a reload
            self.sockaddr = cfg.sockaddr
        self.probe_cfg = probe_cfg
        self.health.rise, self.health.fall = probe_cfg.rise, probe_cfg.fall
        self.send_proxy = send_proxy
        self.greeting.configure(*greeting)
        self.metrics.greeting.set(self.greeting.seconds)
        self.metrics.checks(tuple(c.label for c in probe_cfg.all_checks))
        self._wake.set()

    # --- what traffic reports -------------------------------------------------------------

    def passive_failure(self, reason: str, detail: str = "") -> None:
        """Real traffic failed on this backend: count it and re-probe now."""
        self.metrics.passive[reason].inc()
        if self.health.up and self.health.fails == 0:  # the first of a run is news
            history.record("backend.passive_failure", backend=self.name, step=reason,
                           reason=detail)
        log.warning("backend.passive_failure", backend=self.name, reason=reason, detail=detail)
        self._record(False)
        self._wake.set()


    # --- the verdict ----------------------------------------------------------------------

    def _record(self, ok: bool) -> None:
        if self.health.record(ok):
            self._update_available()
            self.last_change = asyncio.get_running_loop().time()
            up = self.health.up
            self.metrics.transition(up)
            last = self.history[-1].detail if self.history else ""
            log.info("backend.state", backend=self.name, state="up" if up else "down",
                     last=last)
            history.record("backend.up" if up else "backend.down", backend=self.name,
                           reason=last)
            self._on_change(self)

    async def _round(self) -> ProbeResult:
        """Every check at once; each result counted and kept under its check's name."""
        checks = self.probe_cfg.all_checks
        got = await asyncio.gather(*(run_check(c, self.endpoint, self.send_proxy)
                                     for c in checks))
        for c, res in zip(checks, got, strict=True):
            self.metrics.probed(c.label, res.result)
            self.checks.setdefault(c.label, deque(maxlen=HISTORY)).append(res)
        return combine(list(zip(checks, got, strict=True)))

    async def _run(self) -> None:
        while True:
            p = self.probe_cfg
            res = await self._round()
            self.history.append(res)
            self.metrics.probe_duration.observe(res.duration)
            if res.ok and res.greeting is not None:
                self.greeting.observe(res.greeting)
                self.metrics.greeting.set(self.greeting.seconds)
            if not res.ok:
                if self.health.fails == 0:
                    history.record("probe.failed", backend=self.name, result=res.result,
                                   reason=res.detail)
                # the first failure of a run is news; the rest of the run is debug noise
                (log.warning if self.health.fails == 0 else log.debug)(
                    "probe.failed", backend=self.name, kind=p.kind, result=res.result,
                    detail=res.detail, duration=round(res.duration, 4))
            first = len(self.history) == 1
            drain = res.ok and res.drain
            changed = drain != self.draining
            if changed:
                self.draining = drain
                self._update_available()
                log.info("backend.drain" if drain else "backend.undrain", backend=self.name,
                         detail=res.detail)
                history.record("backend.drain" if drain else "backend.undrain",
                               backend=self.name, reason=res.detail)
            self._record(res.ok)
            if changed or (first and not res.ok):
                self._on_change(self)  # a verdict without an up/down transition
            wait = p.fast_interval if self.health.pending else p.interval
            wait *= 1 + random.uniform(-p.jitter, p.jitter)
            self._wake.clear()
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def status(self) -> dict[str, Any]:
        def rows(h: deque[ProbeResult]) -> list[dict[str, Any]]:
            return [{"ok": r.ok, "result": r.result, "detail": r.detail,
                     "duration": round(r.duration, 6), "at": r.at,
                     **({"greeting": round(r.greeting, 6)} if r.greeting is not None else {}),
                     **({"drain": True} if r.drain else {})} for r in reversed(h)]

        return {
            "name": self.name, "up": self.up, "draining": self.draining,
            "local": self.cfg.local, "priority": self.cfg.priority, "source": self.source,
            "probe": {"kind": self.probe_cfg.kind, "interval": self.probe_cfg.interval},
            "greeting_deadline": self.greeting.status(),
            "history": rows(self.history),
            "checks": [{"name": c.label, "kind": c.kind,
                        "history": rows(self.checks.get(c.label, deque()))}
                       for c in self.probe_cfg.all_checks],
        }


class Pool:
    """The ordered backends of one listener, from two sources: the config ("static") and
    DNS discovery ("dns")."""

    def __init__(self, listener: str, probe_cfg: ProbeConfig, send_proxy: str | None,
                 own: Callable[[SockAddr], bool], greeting: Greeting = (None, 10.0)) -> None:
        self.listener = listener
        self.probe_cfg = probe_cfg
        self.send_proxy = send_proxy
        self.greeting = greeting
        self.is_own = own  # "is this one of our own listening addresses?"
        self._subscribers: list[Listener] = []
        self.backends: list[Backend] = []
        self._running = False

    def configure(self, probe_cfg: ProbeConfig, send_proxy: str | None,
                  greeting: Greeting) -> None:
        """New probe defaults (a reload); applied to the backends by the next update()."""
        self.probe_cfg = probe_cfg
        self.send_proxy = send_proxy
        self.greeting = greeting

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
        """The local backend is up and takes new connections (not draining)."""
        b = self.local
        return b is not None and b.available

    def any_up(self) -> bool:
        return any(b.available for b in self.backends)

    def candidates(self) -> list[Backend]:
        """Live backends taking new connections, best first (the list is kept sorted)."""
        return [b for b in self.backends if b.available]

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
                b.reconfigure(c, c.probe or self.probe_cfg, self.send_proxy, self.greeting)
                keep.append(b)
            else:
                gone.append(b)
        for c in wanted.values():
            assert c.sockaddr is not None
            nb = Backend(c, c.probe or self.probe_cfg, self._changed, self.send_proxy, source,
                         c.sockaddr, self.greeting)
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
