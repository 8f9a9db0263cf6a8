"""What one health check found: the record shared by the prober, the metrics and /status.

`result` is a Prometheus label, so it stays one of three values ("success", "failure",
"timeout"); everything an operator needs to act on goes into `detail`, in plain words.  The
two later fields carry what a bare up/down cannot: `greeting`, the seconds an smtp backend
took from connect start to its full 220 greeting (the core learns an adaptive greeting
deadline from it), and `drain`, a backend that is healthy but asks for no new connections
(an agent's `drain`, or an http health document that says "degraded" under
`degraded = "drain"`).  Both default so that code building the old five fields still works.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    result: str  # "success" | "failure" | "timeout"
    detail: str
    duration: float
    at: float  # wall clock, for /status
    greeting: float | None = None  # smtp: connect start -> full 220 greeting, seconds
    drain: bool = False  # up, but send no new connections
