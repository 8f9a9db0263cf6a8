"""Sendmail 8.17, Postfix 3.7 and Exim 4.96 as senders, one message per row, delivering by
MX to the README's one-liner forwarder (issue 13).

The mail network is tests/e2e/mailnet.py (dnsmasq: test.example MX 5 mx1, MX 10 mx2); the
MTAs are the drivers in tests/e2e/mtas.py, each run from its own private root and config
with a greeting timeout of GREETING_TIMEOUT s and told to deliver at once.  Both MX hosts
run exactly `forwarder --listen MX:25 --backend 127.0.0.1:8025 --probe smtp` (plus
`--admin` and JSON logs): no tuned timeouts.  The rows, in this order, for each MTA:

    up                               mail at mx1
    dies between probes              the backend is killed right after the gate opened (the
                                     next probe is an interval away): the forwarder answers
                                     421, mail at mx2
    down                             the gate closes: port 25 refuses, mail at mx2
    hung                             a listener that never greets: the probe sees it, the
                                     gate stays closed, port 25 refuses, mail at mx2
    hangs just before the message    the healthy backend is frozen (SIGSTOP) right after the
                                     gate opened and the message sent at once: the forwarder
                                     waits out its greeting deadline, answers 421, mail at mx2
    xinetd hung / xinetd down        xinetd's redirect on mx1 instead, for comparison

Each row records where the mail went, the seconds the MTA took and what it left queued;
the table (MTA x row) is printed (pytest -s) and written to E2E_MTAS_TABLE for the README.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from ..helpers import ROOT, wait_until
from .mailnet import MX1, MX2, MailNet, Result, mailnet, port_state
from .mtas import MTA, MTAS, deliver

GREETING_TIMEOUT = 30  # each MTA's greeting timeout (their defaults: 5 minutes)
FAST = 2.0  # seconds: the MTA moved on at once (mx1 refused or answered 421 at once)

# ----------------------------------------------------------------------------------------
# The adaptive greeting deadline: "hangs just before the message" costs each sender the
# forwarder's greeting deadline for mx1's backend: 10 s with the first build's fixed
# default, max(1 s, 20 x p99 of recent probe greetings) with greeting_timeout = "auto"
# (health/greeting.py), which measured 1.05 to 1.31 s per MTA here.  The target is 1.5 s;
# the table reports the measured seconds and the forwarder's deadline either way.
HANG_BEFORE_MESSAGE_MAX = 1.5
# ----------------------------------------------------------------------------------------

E2E_MTAS_TABLE = ROOT / ".pytest_cache" / "e2e-mtas-table.md"

ROWS = (
    ("forwarder", "up"),
    ("forwarder", "dies between probes (421 from the forwarder)"),
    ("forwarder", "down (port 25 refuses)"),
    ("forwarder", "hung (port 25 refuses)"),
    ("forwarder", "hangs just before the message (421 after the greeting deadline)"),
    ("xinetd", "hung"),
    ("xinetd", "down"),
)
UP, DIES, DOWN, HUNG, HANGS, XI_HUNG, XI_DOWN = ROWS


@dataclass
class Column:
    """One MTA's results, filled row by row (a failed run keeps the rows it got)."""

    label: str
    cells: dict[tuple[str, str], Result]
    deadline: str = "?"


def render(columns: list[Column]) -> str:
    head = "| front on mx1 | mx1's backend | " + " | ".join(c.label for c in columns) + " |"
    lines = [head, "|---|---|" + "---|" * len(columns)]
    for row in ROWS:
        cells = []
        for c in columns:
            r = c.cells.get(row)
            cells.append(f"{r.where}, {r.seconds:.1f} s, {r.queued} queued" if r else "-")
        lines.append(f"| {row[0]} | {row[1]} | " + " | ".join(cells) + " |")
    notes = ", ".join(f"{c.label}: {c.deadline}" for c in columns)
    return ("\n".join(lines) + "\n\nEach cell: where the mail went, seconds the MTA took, "
            f"messages it left queued.  MTA greeting timeouts {GREETING_TIMEOUT} s; the "
            "forwarder as the README's one-liner, defaults only; its greeting deadline for "
            f"mx1's backend in the hang row: {notes}.\n")


@pytest.fixture(scope="module")
def table() -> Iterator[list[Column]]:
    columns: list[Column] = []
    yield columns
    if columns:
        text = render(columns)
        print("\n" + text)
        E2E_MTAS_TABLE.parent.mkdir(exist_ok=True)
        E2E_MTAS_TABLE.write_text(text)


@pytest.fixture(params=MTAS, ids=[m.name.lower() for m in MTAS])
def sender(request: pytest.FixtureRequest) -> Iterator[tuple[MailNet, MTA]]:
    """A fresh mail network with this MTA set up in the sender's namespace; all of it
    stopped by pid and removed afterwards, also when the test failed."""
    with mailnet() as net:
        mta: MTA = request.param(GREETING_TIMEOUT)
        try:
            work = net.work / mta.name.lower()
            work.mkdir()
            mta.setup(work, net.snd)
            yield net, mta
        finally:
            mta.stop()


def _deadline(status: dict[str, Any]) -> str:
    """The greeting deadline the forwarder reports for its (only) backend, if it does."""
    try:
        d = status["listeners"][0]["backends"][0]["greeting_deadline"]
        return f"{d['seconds']:g} s ({d['mode']})" if isinstance(d, dict) else str(d)
    except (KeyError, IndexError, TypeError):
        return "not reported"


@pytest.mark.heavy
@pytest.mark.timeout(240)
def test_mta_fails_over_by_mx_behind_the_one_liner(sender: tuple[MailNet, MTA],
                                                    table: list[Column]) -> None:
    net, mta = sender
    col = Column(mta.label, {})
    table.append(col)

    def row(which: tuple[str, str]) -> Result:
        r = deliver(net, mta, tag=mta.name.lower())
        col.cells[which] = r
        print(f"--- {mta.label} / {which[0]} / {which[1]}: {r.where} in {r.seconds:.2f}s, "
              f"queued {r.queued}\n{r.transcript[-1500:]}")
        return r

    be2 = net.backend(net.mx2, "mx2")
    fw2 = net.one_liner(net.mx2, MX2)
    fw2.wait_event("gate.open", timeout=15)

    # up: mail lands on mx1
    be1 = net.backend(net.mx1, "mx1")
    fw1 = net.one_liner(net.mx1, MX1)
    fw1.wait_event("gate.open", timeout=15)
    r = row(UP)
    assert r.where == "mx1" and r.queued == 0, r.transcript

    # dies between probes: a fresh forwarder has just opened its gate on a probe, the next
    # is an interval (2 s) away; the backend is killed and the message sent at once: the
    # forwarder's connect is refused and it answers 421, the MTA tries mx2
    fw1.stop()
    fw1 = net.one_liner(net.mx1, MX1)
    fw1.wait_event("gate.open", timeout=15)
    mark = fw1.mark()
    be1.kill()
    r = row(DIES)
    assert r.where == "mx2" and r.queued == 0, r.transcript
    assert r.seconds < FAST, r.transcript
    fw1.wait_event("connection.no_backend", since=mark, timeout=5)  # a 421, not a refusal

    # down: the same forwarder closes its gate (passive failure, then probes); mx1 refuses
    fw1.wait_event("gate.closed", since=mark, timeout=15)
    assert port_state(net.snd, MX1, 25) == "refused"
    r = row(DOWN)
    assert r.where == "mx2" and r.queued == 0, r.transcript
    assert r.seconds < FAST, r.transcript

    # hung (accepts, never greets): once the probe has seen it, the gate stays closed
    mark = fw1.mark()
    hung = net.hung_backend(net.mx1)
    fw1.wait_event("probe.failed", since=mark, timeout=15, result="timeout")
    assert port_state(net.snd, MX1, 25) == "refused"
    r = row(HUNG)
    assert r.where == "mx2" and r.queued == 0, r.transcript
    assert r.seconds < FAST, r.transcript

    # hangs just before the message: a healthy backend, the gate opens on a probe; the
    # backend freezes (SIGSTOP: still accepting, never answering) and the message goes at
    # once, long before the next probe could notice: the forwarder holds the MTA until its
    # greeting deadline, then answers 421
    hung.stop()
    be1 = net.backend(net.mx1, "mx1")
    mark = fw1.mark()
    fw1.wait_event("gate.open", since=mark, timeout=15)
    be1.freeze()
    r = row(HANGS)
    col.deadline = _deadline(net.status(net.mx1))
    fw1.wait_event("connection.no_backend", since=mark, timeout=5)
    assert r.where == "mx2" and r.queued == 0, r.transcript
    assert r.seconds < HANG_BEFORE_MESSAGE_MAX, (
        f"{mta.label} waited {r.seconds:.1f}s behind a backend that hung just before the "
        f"message (limit {HANG_BEFORE_MESSAGE_MAX}s)\n{r.transcript}")
    be1.stop()
    fw1.stop()

    # the same two outages behind xinetd's redirect: the hung one costs the MTA its whole
    # greeting timeout, the dead one nothing
    hung = net.hung_backend(net.mx1)
    xi = net.xinetd(net.mx1)
    r = row(XI_HUNG)
    assert r.where == "mx2" and r.queued == 0, r.transcript
    assert r.seconds >= GREETING_TIMEOUT - 1, r.transcript  # waited out its greeting timeout
    hung.stop()
    wait_until(lambda: port_state(net.mx1, "127.0.0.1", 8025) == "refused", 10,
               "hung backend gone")
    r = row(XI_DOWN)
    assert r.where == "mx2" and r.queued == 0, r.transcript
    xi.stop()

    assert fw2.proc is not None and fw2.proc.poll() is None
    fw2.stop()
    be2.stop()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-s"]))
