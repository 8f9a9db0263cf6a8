"""Ordered backends: gate policy any with a dead local backend, retry on the next live
backend when a connect fails or a backend hangs before greeting, gate local stays closed."""

from __future__ import annotations

import smtplib
import socket

from .helpers import (
    HungBackend,
    SmtpBackend,
    connect_result,
    forwarder,
    free_port,
    toml_listener,
    wait_port,
)


def _peers(local: int, *peers: int, gate: str, greeting_timeout: float = 2.0) -> str:
    extra = f'gate = "{gate}"\ngreeting_timeout = {greeting_timeout}\n'
    for i, p in enumerate(peers):
        extra += f'[[listener.backends]]\naddress = "127.0.0.1:{p}"\npriority = {i + 1}\n'
    return extra


def _send(port: int, n: int) -> None:
    for i in range(n):
        with smtplib.SMTP("127.0.0.1", port, timeout=15) as c:
            c.sendmail("a@example.org", ["b@example.net"], f"Subject: {i}\r\n\r\nmsg {i}\r\n")


def test_gate_any_with_dead_local_splices_every_connection_to_the_live_peer() -> None:
    port, dead = free_port(), free_port()
    with SmtpBackend() as peer:
        cfg = toml_listener(port, dead, extra=_peers(dead, peer.port, gate="any"))
        with forwarder(cfg):
            wait_port("127.0.0.1", port, "open", 10)
            _send(port, 20)
            assert len(peer.wait_messages(20)) == 20


def test_gate_local_stays_closed_while_only_a_peer_is_up() -> None:
    port, dead = free_port(), free_port()
    with SmtpBackend() as peer:
        cfg = toml_listener(port, dead, extra=_peers(dead, peer.port, gate="local"))
        with forwarder(cfg) as fw:
            fw.wait_event("backend.state", state="up", backend=f"127.0.0.1:{peer.port}")
            fw.wait_event("probe.failed", backend=f"127.0.0.1:{dead}")
            assert connect_result("127.0.0.1", port) == "refused"


def test_a_hung_first_backend_is_skipped_before_any_byte_reached_the_client() -> None:
    """The first backend passes probes (slow probe interval), then hangs: the greeting
    watchdog gives up on it and the session goes to the next backend, with no 421."""
    port = free_port()
    with SmtpBackend() as first, SmtpBackend() as second:
        cfg = toml_listener(port, first.port, interval=60,
                            extra=_peers(first.port, second.port, gate="any"))
        with forwarder(cfg) as fw:
            fw.wait_event("backend.state", state="up", backend=f"127.0.0.1:{second.port}")
            fw.wait_event("backend.state", state="up", backend=f"127.0.0.1:{first.port}")
            first.stop()
            with HungBackend(first.port):
                with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
                    s.settimeout(15)
                    assert s.recv(100).startswith(b"220 ")  # the second one's greeting
                _send(port, 1)
            assert len(second.wait_messages(1)) == 1


def test_a_first_backend_that_never_answers_the_syn_is_skipped_after_connect_timeout() -> None:
    """The smtp hand-off waits for the greeting straight after connect(); a backend whose
    SYN goes unanswered must still fail as a *connect* failure at `connect_timeout`, and
    the session moves on to the next backend with no byte lost and no 421.

    The black hole: a listener with backlog 0 whose one queued connection (the first tcp
    probe's) is never accepted; the kernel then drops every further SYN."""
    port = free_port()
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    hole_port = hole.getsockname()[1]
    try:
        with SmtpBackend() as second:
            cfg = toml_listener(port, hole_port, interval=60, probe="tcp",
                                extra="connect_timeout = 0.5\n"
                                + _peers(hole_port, second.port, gate="any"))
            with forwarder(cfg) as fw:
                fw.wait_event("backend.state", state="up", backend=f"127.0.0.1:{second.port}")
                fw.wait_event("backend.state", state="up", backend=f"127.0.0.1:{hole_port}")
                with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
                    s.settimeout(15)
                    assert s.recv(100).startswith(b"220 ")  # the second one's greeting
                ev = fw.wait_event("backend.passive_failure", backend=f"127.0.0.1:{hole_port}")
                assert ev["reason"] == "connect" and ev["detail"] == "timeout", ev
                _send(port, 1)
            assert len(second.wait_messages(1)) == 1
    finally:
        hole.close()
