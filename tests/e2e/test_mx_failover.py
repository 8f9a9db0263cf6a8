"""The project's point, proven with a real MTA: Sendmail delivering by MX to two MX hosts.

A small mail network in network namespaces (tests/e2e/mailnet.py, created and removed by
the test):

    snd (10.99.1.1, 10.99.2.1)  sendmail, delivering by MX; dnsmasq on 127.0.0.1:53 serving
                                 test.example MX 5 mx1, MX 10 mx2
    mx1 (10.99.1.2)             port 25: the forwarder (or xinetd, for comparison)
                                 in front of 127.0.0.1:8025 (aiosmtpd Maildir, or a hung one)
    mx2 (10.99.2.2)             port 25: the forwarder in front of 127.0.0.1:8025 (aiosmtpd)

Each scenario sends one message with `sendmail -odi` (deliver now, in the foreground) and
records where it arrived, how long sendmail took, and what it left queued.  Sendmail's
greeting timeout is set to GREETING_TIMEOUT seconds (5 minutes by default) so the hung
case stays short.  The table is printed (pytest -s) and written to E2E_TABLE for the README.
Postfix and Exim beside it, with the README's one-liner forwarder: test_three_mtas.py.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import pytest

from ..helpers import ROOT, wait_until
from .mailnet import MX1, MailNet, Result, mailnet, port_state
from .mtas import Sendmail, deliver

GREETING_TIMEOUT = 10
E2E_TABLE = ROOT / ".pytest_cache" / "e2e-table.md"


@contextlib.contextmanager
def sendmail_net() -> Iterator[tuple[MailNet, Sendmail]]:
    with mailnet() as net:
        mta = Sendmail(GREETING_TIMEOUT)
        try:
            sm = net.work / "sm"
            sm.mkdir()
            mta.setup(sm, net.snd)
            yield net, mta
        finally:
            mta.stop()


def test_sendmail_fails_over_by_mx_when_the_forwarder_closes_its_gate() -> None:
    rows: list[tuple[str, str, str, float, int]] = []

    def record(front: str, backend: str, r: Result) -> None:
        rows.append((front, backend, r.where, r.seconds, r.queued))
        print(f"--- {front} / {backend}: {r.where} in {r.seconds:.2f}s, queued {r.queued}\n"
              f"{r.transcript[-1500:]}")

    with sendmail_net() as (net, mta):
        be2 = net.backend(net.mx2, "mx2")
        fw2 = net.forwarder(net.mx2)
        fw2.wait_event("gate.open", timeout=15)

        # 1. the primary is healthy: mail lands on mx1
        be1 = net.backend(net.mx1, "mx1")
        fw1 = net.forwarder(net.mx1)
        fw1.wait_event("gate.open", timeout=15)
        r = deliver(net, mta)
        record("forwarder", "up", r)
        assert r.where == "mx1" and r.queued == 0, r.transcript

        # 2. its backend dies between two probes: the gate is still open when sendmail
        # connects (the probe interval is long); the connection is answered 421 or the
        # gate has already closed on the passive failure; either way, mx2 at once
        fw1.stop()
        fw1 = net.forwarder(net.mx1, interval=60)
        fw1.wait_event("gate.open", timeout=15)
        be1.stop()
        r = deliver(net, mta)
        record("forwarder", "dies between probes", r)
        assert r.where == "mx2" and r.queued == 0, r.transcript
        assert r.seconds < GREETING_TIMEOUT / 2, r.transcript
        fw1.stop()

        # 3. backend down: the forwarder refuses on mx1, sendmail goes to mx2 at once
        fw1 = net.forwarder(net.mx1)
        fw1.wait_event("probe.failed", timeout=15)  # it starts closed and stays so
        assert port_state(net.snd, MX1, 25) == "refused"
        r = deliver(net, mta)
        record("forwarder", "down", r)
        assert r.where == "mx2" and r.queued == 0, r.transcript
        assert r.seconds < GREETING_TIMEOUT / 2, r.transcript

        # 4. backend hung (accepts, never greets): the smtp probe keeps the gate closed
        hung = net.hung_backend(net.mx1)
        assert port_state(net.snd, MX1, 25) == "refused"
        r = deliver(net, mta)
        record("forwarder", "hung", r)
        assert r.where == "mx2" and r.queued == 0, r.transcript
        assert r.seconds < GREETING_TIMEOUT / 2, r.transcript
        fw1.stop()

        # 5. backend hangs while the gate is open (the next probe is a minute away): the
        # greeting watchdog answers 421 after greeting_timeout, sendmail moves on
        hung.stop()
        be1 = net.backend(net.mx1, "mx1")
        fw1 = net.forwarder(net.mx1, interval=60, greeting_timeout=2)
        fw1.wait_event("gate.open", timeout=15)
        be1.stop()
        hung = net.hung_backend(net.mx1)
        r = deliver(net, mta)
        record("forwarder", "hangs between probes", r)
        assert r.where == "mx2" and r.queued == 0, r.transcript
        assert 2 <= r.seconds < GREETING_TIMEOUT - 2, r.transcript
        fw1.stop()

        # the same two outages behind xinetd's redirect
        xi = net.xinetd(net.mx1)
        r = deliver(net, mta)
        record("xinetd", "hung", r)
        assert r.where == "mx2" and r.queued == 0, r.transcript
        # waited out the greeting timeout
        assert r.seconds >= GREETING_TIMEOUT - 1, r.transcript
        hung.stop()
        wait_until(lambda: port_state(net.mx1, "127.0.0.1", 8025) == "refused", 10,
                   "hung backend gone")
        r = deliver(net, mta)
        record("xinetd", "down", r)
        assert r.where == "mx2" and r.queued == 0, r.transcript
        xi.stop()
        assert fw2.proc is not None and fw2.proc.poll() is None
        fw2.stop()
        be2.stop()

    table = ["| front on mx1 | mx1's backend | mail went to | seconds | left queued |",
             "|---|---|---|---|---|"]
    table += [f"| {f} | {b} | {w} | {t:.1f} | {q} |" for f, b, w, t, q in rows]
    text = "\n".join(table) + "\n"
    print(text)
    E2E_TABLE.parent.mkdir(exist_ok=True)
    E2E_TABLE.write_text(f"Sendmail greeting timeout {GREETING_TIMEOUT} s "
                         f"(default 5 min)\n\n{text}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-s"]))
