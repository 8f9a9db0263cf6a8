"""agent: ask a small agent on the backend's host how the backend is, HAProxy-style.

The agent listens on `check.port` of the backend's host and answers one line, then closes
(HAProxy's agent-check protocol): the words are separated by spaces, tabs or commas, and a
'#' starts a free-text description.  The state word wins over everything else on the line:
`down`, `fail` or `stopped` is down (the rest of the line is the detail), `maint` is down
("maint"), `drain` is up but asks for no new connections, `up` or `ready` is up.  A weight
alone (`75%`) means up; `0%` means drain, as a zero weight does in HAProxy (no new
traffic).  `maxconn:N` is understood and ignored.  When several state words appear, the
most cautious one wins (down, then maint, then drain, then up), so a confused agent never
turns a backend up.  A line with none of these words is garbage, and a silent agent ends
in the timeout: both count against the backend.

The line may end with LF, or with the agent closing the connection; it is capped at
LINE_CAP bytes.
"""

from __future__ import annotations

import asyncio
import re

from ...config.model import CheckConfig, Endpoint
from .common import LINE_CAP, CheckFailed, Progress, Verdict, connect, quote, streams

_UP = {"up", "ready"}
_DOWN = {"down", "fail", "stopped"}
_WEIGHT = re.compile(r"^\d{1,3}%$")
_MAXCONN = re.compile(r"^maxconn:\d+$")
_SEPARATORS = re.compile(r"[ \t,]+")
_EOL = b"\r\n"


async def check(cfg: CheckConfig, target: Endpoint, progress: Progress) -> Verdict:
    if cfg.port is None:
        raise CheckFailed("agent check without a port")
    sock, _ = await connect(target.host, cfg.port, progress)
    reader, writer = await streams(sock)
    try:
        progress.step = "the agent's answer"
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise CheckFailed(f"agent line longer than {LINE_CAP} bytes") from None
        except asyncio.IncompleteReadError as e:
            # HAProxy also takes a line ended by the agent closing the connection
            if not e.partial:
                raise CheckFailed("agent closed the connection without a word") from None
            line = e.partial
    finally:
        writer.transport.abort()
    return parse(line)


def parse(raw: bytes) -> Verdict:
    """The verdict of one agent line (LF or CRLF included or not)."""
    text = raw.rstrip(b"\r\n").decode("utf-8", "replace")
    if not text.strip():
        raise CheckFailed("agent sent an empty line")
    head, _, description = text.partition("#")
    description = description.strip()
    words = [w for w in _SEPARATORS.split(head.strip()) if w]
    lowered = [w.lower() for w in words]

    for i, w in enumerate(lowered):
        if w in _DOWN:
            rest = description or " ".join(words[i + 1:])
            return Verdict(False, f"agent says {w}" + (f": {quote(rest)}" if rest else ""))
    if "maint" in lowered:
        return Verdict(False, "maint" + (f": {quote(description)}" if description else ""))

    weights = [w for w in lowered if _WEIGHT.match(w)]
    if "drain" in lowered:
        return Verdict(True, "drain", drain=True)
    if any(w in _UP for w in lowered) or weights:
        if weights and int(weights[-1][:-1]) == 0:
            return Verdict(True, f"weight {weights[-1]}: drain", drain=True)
        said = [w for w in lowered if w in _UP or _WEIGHT.match(w) or _MAXCONN.match(w)]
        return Verdict(True, "agent says " + " ".join(said))
    raise CheckFailed(f"agent answered garbage: {quote(raw.rstrip(_EOL))}")
