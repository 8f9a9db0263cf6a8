"""Prometheus metrics: one registry, names in base units, bounded labels.

Label values are listener names, backend names and fixed outcome words: never client
addresses.  Hot-path users pre-bind their children (`ListenerMetrics`) so a connection costs
attribute lookups and increments, not label resolution.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from itertools import accumulate
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .. import __version__

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# Outcomes of an accepted (or refused-at-accept) connection.  Exported as 0 up front.
OUTCOMES = (
    "spliced",  # relayed to a backend and finished normally (both sides closed)
    "no_backend_421",  # no live backend: answered 421 (smtp) or closed (tcp)
    "backend_failed_421",  # backend connect/greeting failed on every candidate: 421 / close
    "refused_acl",  # only_from / no_access
    "rate_limited",  # instances / per_source / cps
    "idle_timeout",  # closed by the idle timer
    "error",  # a splice that ended in a reset or I/O error
)
PROBE_RESULTS = ("success", "failure", "timeout")
DIRECTIONS = ("client_to_backend", "backend_to_client")

# ------------------------------------------------------------------ hot-path families
# prometheus_client takes a lock and validates its argument on every inc()/observe(); at
# ~10,000 sessions/s and seven updates per session that was ~7% of the forwarder's CPU.
# The per-connection metrics are therefore plain numbers in slotted objects, written only by
# the event loop's thread and turned into metric families when /metrics is scraped (also on
# that thread): same names, labels and buckets as before.


class Tally:
    """A counter or gauge child: one number, no lock."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class Buckets:
    """A histogram child: per-bucket counts (cumulated only at scrape time) and a sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # first bound >= value: `le`
        self.sum += value


class HotFamily:
    """A labelled counter or gauge family of Tally children; `labels()` returns the same
    child for the same values, so a listener re-created by a reload keeps counting on."""

    def __init__(self, name: str, doc: str, kind: str, labelnames: Sequence[str]) -> None:
        self.name, self.doc, self.labelnames = name, doc, list(labelnames)
        self.metric_family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        self.children: dict[tuple[str, ...], Tally] = {}

    def labels(self, *values: str) -> Tally:
        return self.children.setdefault(values, Tally())

    def family(self) -> Metric:
        # Scraped on the admin thread while the loop may add a child (a new backend): iterate
        # a copy, made by one C call that the loop's thread cannot interleave with.
        fam = self.metric_family(self.name, self.doc, labels=self.labelnames)
        for values, child in self.children.copy().items():
            fam.add_metric(list(values), child.value)
        return fam


class HotHistogram:
    """A labelled histogram family of Buckets children (same `labels()` contract)."""

    def __init__(self, name: str, doc: str, labelnames: Sequence[str],
                 buckets: tuple[float, ...]) -> None:
        self.name, self.doc, self.labelnames = name, doc, list(labelnames)
        self.bounds = buckets
        self.children: dict[tuple[str, ...], Buckets] = {}

    def labels(self, *values: str) -> Buckets:
        return self.children.setdefault(values, Buckets(self.bounds))

    def family(self) -> Metric:
        h = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        les = [floatToGoString(b)  # type: ignore[no-untyped-call]
               for b in (*self.bounds, float("inf"))]
        for values, child in self.children.copy().items():  # see HotFamily.family
            h.add_metric(list(values), list(zip(les, accumulate(child.counts), strict=True)),
                         child.sum)
        return h


class _HotCollector(Collector):
    def __init__(self, families: list[HotFamily | HotHistogram]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for f in self.families:
            yield f.family()


build_info = Info("forwarder_build", "Build information", registry=REGISTRY)
build_info.info({"version": __version__})

gate_open = Gauge("forwarder_gate_open", "1 while the listener accepts connections",
                  ["listener"], registry=REGISTRY)
gate_transitions = Counter("forwarder_gate_transitions_total",
                           "Gate state changes, by new state and reason",
                           ["listener", "state", "reason"], registry=REGISTRY)
backend_up = Gauge("forwarder_backend_up", "1 while the backend's health state is up",
                   ["backend"], registry=REGISTRY)
backend_transitions = Counter("forwarder_backend_transitions_total",
                              "Backend health changes, by new state",
                              ["backend", "state"], registry=REGISTRY)
probe_duration = Histogram("forwarder_probe_duration_seconds", "Duration of health probes",
                           ["backend"], registry=REGISTRY,
                           buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5,
                                    1, 2.5, 5, 10))
probes = Counter("forwarder_probes_total", "Health checks run, by check and result",
                 ["backend", "check", "result"], registry=REGISTRY)
greeting_deadline = Gauge("forwarder_backend_greeting_deadline_seconds",
                          "How long a connection waits for this backend's greeting (smtp "
                          "mode): learned from its probes, or the configured number",
                          ["backend"], registry=REGISTRY)
passive_failures = Counter("forwarder_backend_passive_failures_total",
                           "Failures seen by real traffic (connect or greeting)",
                           ["backend", "reason"], registry=REGISTRY)
connections = HotFamily("forwarder_connections_total", "Connections by outcome", "counter",
                        ["listener", "outcome"])
connections_active = HotFamily("forwarder_connections_active", "Connections being relayed now",
                               "gauge", ["listener"])
backend_connect = HotHistogram("forwarder_backend_connect_seconds",
                               "Time until a backend connection was usable: connected (tcp "
                               "mode, or with send_proxy), greeted (smtp mode)", ["backend"],
                               buckets=(.0001, .00025, .0005, .001, .0025, .005, .01, .025,
                                        .05, .1, .25, .5, 1, 2.5, 5))
splice_bytes = HotFamily("forwarder_splice_bytes_total", "Bytes relayed, by direction",
                         "counter", ["listener", "direction"])
splice_duration = HotHistogram("forwarder_splice_duration_seconds",
                               "Lifetime of relayed connections", ["listener"],
                               buckets=(.001, .005, .01, .05, .1, .5, 1, 5, 10, 30, 60, 300,
                                        900, 3600))
REGISTRY.register(_HotCollector([connections, connections_active, backend_connect,
                                 splice_bytes, splice_duration]))
dns_lookups = Counter("forwarder_dns_lookups_total", "Peer discovery lookups by result",
                      ["listener", "result"], registry=REGISTRY)
dns_peers = Gauge("forwarder_dns_peers", "Peers currently known from DNS discovery",
                  ["listener"], registry=REGISTRY)
accept_errors = Counter("forwarder_accept_errors_total",
                        "accept() failures (EMFILE, ENFILE, ENOBUFS, ...)",
                        ["listener", "errno"], registry=REGISTRY)
gate_open_failures = Counter("forwarder_gate_open_failures_total",
                             "The gate should open but listen() failed (retried with backoff)",
                             ["listener", "errno"], registry=REGISTRY)
internal_errors = Counter("forwarder_internal_errors_total",
                          "Exceptions in a supervised task or callback (logged, task restarted)",
                          ["task"], registry=REGISTRY)
for _task in ("probe", "discovery", "sweeper", "watchdog", "handoff", "accept", "relay",
              "admin", "gate"):
    internal_errors.labels(_task)


class ListenerMetrics:
    """Children bound once per listener, so the accept/relay path does no label lookups."""

    def __init__(self, listener: str) -> None:
        self.name = listener
        self.gate_open = gate_open.labels(listener)
        self.gate_open.set(0)
        self.outcome = {o: connections.labels(listener, o) for o in OUTCOMES}
        self.active = connections_active.labels(listener)
        self.active.set(0)
        self.bytes_up = splice_bytes.labels(listener, DIRECTIONS[0])
        self.bytes_down = splice_bytes.labels(listener, DIRECTIONS[1])
        self.duration = splice_duration.labels(listener)
        for reason in ("probe", "drain", "shutdown"):
            for state in ("open", "closed"):
                gate_transitions.labels(listener, state, reason)

    def transition(self, state: str, reason: str) -> None:
        gate_transitions.labels(self.name, state, reason).inc()
        self.gate_open.set(1 if state == "open" else 0)


class BackendMetrics:
    def __init__(self, backend: str, checks: tuple[str, ...] = ()) -> None:
        self.name = backend
        self.up = backend_up.labels(backend)
        self.up.set(0)
        self.probe_duration = probe_duration.labels(backend)
        self.checks(checks)
        self.greeting = greeting_deadline.labels(backend)
        self.connect = backend_connect.labels(backend)
        self.passive = {r: passive_failures.labels(backend, r)
                        for r in ("connect", "greeting")}
        for s in ("up", "down"):
            backend_transitions.labels(backend, s)

    def checks(self, names: tuple[str, ...]) -> None:
        """Export 0 for every (check, result) known in advance."""
        for c in names:
            for r in PROBE_RESULTS:
                probes.labels(self.name, c, r)

    def probed(self, check: str, result: str) -> None:
        probes.labels(self.name, check, result).inc()

    def transition(self, up: bool) -> None:
        self.up.set(1 if up else 0)
        backend_transitions.labels(self.name, "up" if up else "down").inc()


# ------------------------------------------------------------------ worker processes
# A worker counts its connections in its own copy of these families and sends cumulative
# values to the master (workers/hub.py), which adds each report's difference to its own:
# one /metrics for the whole process tree, the same names and labels as a single process.

HOT: tuple[HotFamily, ...] = (connections, connections_active, splice_bytes)
HOT_HISTOGRAMS: tuple[HotHistogram, ...] = (backend_connect, splice_duration)
# (counter, its label names): prometheus_client keeps these private
WORKER_COUNTERS: tuple[tuple[Counter, tuple[str, ...]], ...] = (
    (internal_errors, ("task",)), (accept_errors, ("listener", "errno")))

Snapshot = dict[str, dict[tuple[str, ...], Any]]


def snapshot() -> Snapshot:
    """This process's cumulative values of what a worker counts."""
    out: Snapshot = {}
    for f in HOT:
        out[f.name] = {k: c.value for k, c in list(f.children.items())}
    for h in HOT_HISTOGRAMS:
        out[h.name] = {k: (list(c.counts), c.sum) for k, c in list(h.children.items())}
    for counter, labels in WORKER_COUNTERS:
        for m in counter.collect():
            out[m.name] = {tuple(smp.labels[n] for n in labels): smp.value
                           for smp in m.samples if smp.name.endswith("_total")}
    return out


class Merger:
    """Folds workers' snapshots into this process's families."""

    def __init__(self) -> None:
        self.last: dict[int, Snapshot] = {}

    def apply(self, worker: int, snap: Snapshot) -> None:
        last = self.last.get(worker, {})
        for f in HOT:
            before = last.get(f.name, {})
            for k, v in snap.get(f.name, {}).items():
                d = v - before.get(k, 0.0)
                if d:
                    f.labels(*k).inc(d)
        for h in HOT_HISTOGRAMS:
            before = last.get(h.name, {})
            for k, (counts, total) in snap.get(h.name, {}).items():
                old_counts, old_sum = before.get(k, ([0] * len(counts), 0.0))
                child = h.labels(*k)
                for i, (n, o) in enumerate(zip(counts, old_counts, strict=True)):
                    child.counts[i] += n - o
                child.sum += total - old_sum
        for counter, _ in WORKER_COUNTERS:
            for m in counter.collect():
                before = last.get(m.name, {})
                for k, v in snap.get(m.name, {}).items():
                    d = v - before.get(k, 0.0)
                    if d > 0:
                        counter.labels(*k).inc(d)
        self.last[worker] = snap

    def forget(self, worker: int) -> None:
        """A worker is gone: what it counted stays; what it held open (a gauge) does not."""
        last = self.last.pop(worker, {})
        for k, v in last.get(connections_active.name, {}).items():
            connections_active.labels(*k).inc(-v)
