"""Prometheus metrics: one registry, names in base units, bounded labels.

Label values are listener names, backend names and fixed outcome words: never client
addresses.  Hot-path users pre-bind their children (`ListenerMetrics`) so a connection costs
attribute lookups and increments, not label resolution.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

from . import __version__

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
probes = Counter("forwarder_probes_total", "Health probes by result",
                 ["backend", "result"], registry=REGISTRY)
passive_failures = Counter("forwarder_backend_passive_failures_total",
                           "Failures seen by real traffic (connect or greeting)",
                           ["backend", "reason"], registry=REGISTRY)
connections = Counter("forwarder_connections_total", "Connections by outcome",
                      ["listener", "outcome"], registry=REGISTRY)
connections_active = Gauge("forwarder_connections_active", "Connections being relayed now",
                           ["listener"], registry=REGISTRY)
backend_connect = Histogram("forwarder_backend_connect_seconds",
                            "Time to connect to a backend (successful connects)",
                            ["backend"], registry=REGISTRY,
                            buckets=(.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05,
                                     .1, .25, .5, 1, 2.5, 5))
splice_bytes = Counter("forwarder_splice_bytes_total", "Bytes relayed, by direction",
                       ["listener", "direction"], registry=REGISTRY)
splice_duration = Histogram("forwarder_splice_duration_seconds", "Lifetime of relayed connections",
                            ["listener"], registry=REGISTRY,
                            buckets=(.001, .005, .01, .05, .1, .5, 1, 5, 10, 30, 60, 300, 900,
                                     3600))
dns_lookups = Counter("forwarder_dns_lookups_total", "Peer discovery lookups by result",
                      ["listener", "result"], registry=REGISTRY)
dns_peers = Gauge("forwarder_dns_peers", "Peers currently known from DNS discovery",
                  ["listener"], registry=REGISTRY)
accept_errors = Counter("forwarder_accept_errors_total",
                        "accept() failures (EMFILE, ENFILE, ENOBUFS, ...)",
                        ["listener", "errno"], registry=REGISTRY)


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
    def __init__(self, backend: str) -> None:
        self.up = backend_up.labels(backend)
        self.up.set(0)
        self.probe_duration = probe_duration.labels(backend)
        self.probe = {r: probes.labels(backend, r) for r in PROBE_RESULTS}
        self.connect = backend_connect.labels(backend)
        self.passive = {r: passive_failures.labels(backend, r)
                        for r in ("connect", "greeting")}
        self.name = backend
        for s in ("up", "down"):
            backend_transitions.labels(backend, s)

    def transition(self, up: bool) -> None:
        self.up.set(1 if up else 0)
        backend_transitions.labels(self.name, "up" if up else "down").inc()
