"""SMTP mode: mail goes through; the smtp probe catches a hung backend; no silent drops."""

from __future__ import annotations

import smtplib
import socket
import time

import pytest

from .helpers import (
    HungBackend,
    SmtpBackend,
    connect_result,
    forwarder,
    free_port,
    smtp_reply,
    toml_listener,
    wait_port,
)


def test_message_reaches_backend_through_forwarder() -> None:
    port = free_port()
    with SmtpBackend() as be, forwarder(toml_listener(port, be.port)):
        wait_port("127.0.0.1", port, "open", 10)
        body = "Subject: through the forwarder\r\n\r\n" + "line of text\r\n" * 5000
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
            c.sendmail("alice@example.org", ["bob@example.net"], body)
        msgs = be.wait_messages(1)
    assert msgs[0]["from"] == "alice@example.org"
    assert msgs[0]["to"] == ["bob@example.net"]
    assert b"through the forwarder" in msgs[0]["data"]
    assert msgs[0]["data"].count(b"line of text") == 5000


@pytest.mark.parametrize("kind,expect", [("smtp", "refused"), ("tcp", "open")])
def test_probe_kind_against_hung_backend(kind: str, expect: str) -> None:
    """A backend that accepts TCP but never greets (a stuck JVM): only the smtp probe sees it."""
    port = free_port()
    with HungBackend() as be:
        cfg = toml_listener(port, be.port, probe=kind, interval=0.2, rise=1, fall=1,
                            probe_timeout=0.5)
        with forwarder(cfg) as fw:
            # wait for three completed probes, then look at the port
            for _ in range(3):
                fw.wait_event("probe.failed" if kind == "smtp" else "gate.open", timeout=10)
                if kind == "tcp":
                    break
            assert connect_result("127.0.0.1", port) == expect
            if kind == "smtp":
                ev = next(e for e in fw.events if e["event"] == "probe.failed")
                assert ev["result"] == "timeout"
                assert not any(e["event"] == "gate.open" for e in fw.events)


def test_backend_dies_between_probes_client_gets_421_not_silence() -> None:
    """The gate is still open when the backend dies: the next client gets a 421 at once,
    and that passive failure closes the gate within ~100 ms."""
    port = free_port()
    be = SmtpBackend().start()
    cfg = toml_listener(port, be.port, interval=30.0, rise=1, fall=2)  # the prober is asleep
    try:
        with forwarder(cfg) as fw:
            fw.wait_event("gate.open")  # not wait_port: its connection would race be.stop()
            mark = fw.mark()
            be.stop()
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                t0 = time.monotonic()
                reply = smtp_reply(s)
                assert reply.startswith(b"421 4.3.2 ")
                assert b"Service not available" in reply
                assert s.recv(100) == b""  # then a clean close (FIN), not a reset
            closed = fw.wait_event("gate.closed", since=mark, timeout=5)
            assert closed["reason"] == "probe"
            t = time.monotonic() - t0
            assert connect_result("127.0.0.1", port) == "refused"
            assert t < 1.0, f"gate closed {t:.3f}s after the failed client"
            outcome = fw.wait_event("connection.no_backend", since=mark)
            assert outcome["outcome"] == "backend_failed_421"
    finally:
        be.stop()


def test_passive_failure_closes_gate_within_100ms() -> None:
    port = free_port()
    be = SmtpBackend().start()
    cfg = toml_listener(port, be.port, interval=30.0, rise=1, fall=2)
    try:
        with forwarder(cfg) as fw:
            wait_port("127.0.0.1", port, "open", 10)
            mark = fw.mark()
            be.stop()
            try:  # wait_port's own connection may already have hit the dead backend
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    smtp_reply(s)
            except ConnectionRefusedError:
                pass
            fail = fw.wait_event("backend.passive_failure", since=mark)
            closed = fw.wait_event("gate.closed", since=mark)
            from datetime import datetime
            dt = (datetime.fromisoformat(closed["timestamp"]) -
                  datetime.fromisoformat(fail["timestamp"])).total_seconds()
            assert dt < 0.1, f"{dt:.3f}s from the failed connect to the closed gate"
    finally:
        be.stop()
