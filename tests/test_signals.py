"""SIGTERM drains gracefully; SIGHUP reloads without dropping live splices."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import socket
import threading
import time
import urllib.request
from typing import Any

from .helpers import (
    EchoBackend,
    SmtpBackend,
    connect_result,
    forwarder,
    free_port,
    toml_listener,
    wait_port,
    wait_until,
)


def test_sigterm_lets_live_splice_finish_then_exits_0() -> None:
    port = free_port()
    with EchoBackend() as be, \
            forwarder(toml_listener(port, be.port, mode="tcp", probe="tcp")) as fw:
        wait_port("127.0.0.1", port, "open", 10)
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"before")
        assert s.recv(100) == b"before"
        mark = fw.mark()
        fw.signal(signal.SIGTERM)
        fw.wait_event("gate.closed", since=mark, reason="shutdown")
        assert connect_result("127.0.0.1", port) == "refused"
        # the live splice still works while draining
        payload = os.urandom(200_000)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        s.close()
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        assert fw.proc is not None
        assert fw.proc.wait(10) == 0
        fw.read_events()
        stopped = [e for e in fw.events if e["event"] == "forwarder.stopped"]
        assert stopped and stopped[0]["cut"] == 0


def test_sigterm_cuts_splices_after_drain_timeout() -> None:
    port = free_port()
    cfg = toml_listener(port, 0, mode="tcp", probe="tcp").replace("drain_timeout = 5",
                                                                  "drain_timeout = 0.3")
    with EchoBackend() as be:
        cfg = cfg.replace("127.0.0.1:0", f"127.0.0.1:{be.port}")
        with forwarder(cfg) as fw:
            wait_port("127.0.0.1", port, "open", 10)
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"x")
            assert s.recv(1) == b"x"
            t0 = time.monotonic()
            fw.signal(signal.SIGTERM)
            assert fw.proc is not None and fw.proc.wait(10) == 0
            assert time.monotonic() - t0 < 5
            fw.read_events()
            assert next(e for e in fw.events if e["event"] == "forwarder.stopped")["cut"] == 1
            s.close()


def test_sighup_reload_switches_backend_without_dropping_live_splice() -> None:
    port = free_port()
    with EchoBackend() as old, SmtpBackend() as new, \
            forwarder(toml_listener(port, old.port, mode="tcp", probe="tcp")) as fw:
        wait_port("127.0.0.1", port, "open", 10)
        live = socket.create_connection(("127.0.0.1", port), timeout=10)
        live.sendall(b"one")
        assert live.recv(10) == b"one"
        fw.config_path.write_text(toml_listener(port, new.port, mode="tcp", probe="smtp"))
        mark = fw.mark()
        fw.signal(signal.SIGHUP)
        fw.wait_event("reload.done", since=mark)
        # the old splice is untouched
        live.sendall(b"two")
        assert live.recv(10) == b"two"
        live.close()
        # new connections go to the new backend once its probe passes
        fw.wait_event("backend.state", since=mark, state="up",
                      backend=f"127.0.0.1:{new.port}")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            assert s.recv(100).startswith(b"220 ")


def test_sighup_with_bad_config_keeps_running(tmp_path: object) -> None:
    port = free_port()
    with EchoBackend() as be, \
            forwarder(toml_listener(port, be.port, mode="tcp", probe="tcp")) as fw:
        wait_port("127.0.0.1", port, "open", 10)
        fw.config_path.write_text("[[listener]]\nport = 'x'\n")
        mark = fw.mark()
        fw.signal(signal.SIGHUP)
        err = fw.wait_event("reload.failed", since=mark)
        assert "listener.0" in err["error"]
        assert connect_result("127.0.0.1", port) == "open"


def test_sighup_under_traffic_keeps_200_splices_and_the_bound_socket() -> None:
    """A reload that changes probe interval, limits and adds a backend: 200 live splices
    carry on intact, and a client connecting in a loop throughout is never refused."""
    port, admin = free_port(), free_port()
    n = 200
    top = f'admin = "127.0.0.1:{admin}"'
    with EchoBackend() as be, EchoBackend() as extra, \
            forwarder(toml_listener(port, be.port, mode="tcp", probe="tcp", top=top)) as fw:
        wait_port("127.0.0.1", port, "open", 10)
        conns = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]
        for i, c in enumerate(conns):
            c.sendall(b"hello %d" % i)
        for i, c in enumerate(conns):
            assert c.recv(100) == b"hello %d" % i
        refused = 0
        stop = threading.Event()

        def knock() -> None:
            nonlocal refused
            deadline = time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < deadline:
                refused += connect_result("127.0.0.1", port, timeout=5) == "refused"
                stop.wait(0.002)  # a client's pace, not a flood: a flood fills any backlog

        t = threading.Thread(target=knock)
        t.start()
        try:
            fw.config_path.write_text(toml_listener(
                port, be.port, mode="tcp", probe="tcp", interval=0.5, top=top,
                extra=f'[[listener.backends]]\naddress = "127.0.0.1:{extra.port}"\npriority = 1\n'
                      '[listener.access]\nper_source = 1000\n').replace(
                f'backend = "127.0.0.1:{be.port}"',
                f'[[listener.backends]]\naddress = "127.0.0.1:{be.port}"'))
            mark = fw.mark()
            fw.signal(signal.SIGHUP)
            fw.wait_event("reload.done", since=mark)
            fw.wait_event("backend.state", since=mark, state="up",
                          backend=f"127.0.0.1:{extra.port}")
        finally:
            stop.set()
            t.join(35)
        assert refused == 0
        # the new interval is in effect: reported, and the probes now run 0.5 s apart
        local = _status(admin)["listeners"][0]["backends"][0]
        assert local["probe"]["interval"] == 0.5
        first = local["history"][0]["at"]
        wait_until(lambda: _probe_times(admin, first) >= 3, 10, "three more probes")
        times = [h["at"] for h in _status(admin)["listeners"][0]["backends"][0]["history"]]
        gaps = [a - b for a, b in itertools.pairwise(times)][:2]
        assert all(0.4 <= g <= 1.0 for g in gaps), gaps
        payload = os.urandom(20_000)
        for c in conns:
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
        for c in conns:
            got = b""
            while chunk := c.recv(65536):
                got += chunk
            c.close()
            assert got == payload


def _status(admin: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=5) as r:
        return dict(json.load(r))


def _probe_times(admin: int, after: float) -> int:
    hist = _status(admin)["listeners"][0]["backends"][0]["history"]
    return sum(1 for h in hist if h["at"] > after)


def test_reload_adding_per_source_counts_the_live_connections() -> None:
    """Limits added by a reload apply to the connections already relayed: with two live
    sessions from 127.0.0.1 and per_source = 2, a third from there is turned away."""
    port = free_port()
    with EchoBackend() as be, \
            forwarder(toml_listener(port, be.port, mode="tcp", probe="tcp",
                                    address="0.0.0.0")) as fw:
        wait_port("127.0.0.1", port, "open", 10)
        live = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        for s in live:
            s.sendall(b"x")
            assert s.recv(1) == b"x"
        fw.config_path.write_text(toml_listener(
            port, be.port, mode="tcp", probe="tcp", address="0.0.0.0",
            extra="[listener.access]\nper_source = 2\n"))
        mark = fw.mark()
        fw.signal(signal.SIGHUP)
        fw.wait_event("reload.done", since=mark)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as third:
            third.settimeout(10)
            assert third.recv(10) == b""  # turned away: closed without a byte
        fw.wait_event("connection.refused", since=mark, outcome="rate_limited")
        other = socket.socket()
        other.bind(("127.0.0.2", 0))
        other.settimeout(10)
        other.connect(("127.0.0.1", port))
        other.sendall(b"y")
        assert other.recv(1) == b"y"  # another source is still admitted
        other.close()
        for s in live:
            s.close()
