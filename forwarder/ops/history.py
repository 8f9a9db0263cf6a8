"""The recent history an operator asks for at 3 a.m.: what the gates and backends did, and
why (GET /events, the status page, `forwarder status --events`).

A bounded ring of plain dicts, written by the master's loop (gate transitions, backend
verdicts, drains, probe failures, reloads) and read by the admin thread, which copies it
(deque appends and list() copies are atomic under the GIL).  Kept apart from the logs on
purpose: the log level may hide info events, and a log may be gone; this history is there
for as long as the process runs, whatever the level.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Any

SIZE = 500

_events: deque[dict[str, Any]] = deque(maxlen=SIZE)
_seq = itertools.count(1)


def record(kind: str, **fields: Any) -> None:
    """One event: `kind` (gate.open, gate.closed, backend.up, backend.down, backend.drain,
    backend.undrain, probe.failed, reload.done, reload.failed, drain, resume, ...) and
    what changed and why."""
    _events.append({"seq": next(_seq), "time": time.time(), "kind": kind, **fields})


def recent(limit: int = SIZE, since: int = 0) -> list[dict[str, Any]]:
    """Oldest first; `since`: only events with a larger seq."""
    out = [e for e in list(_events) if e["seq"] > since]
    return out[-limit:] if limit < len(out) else out
