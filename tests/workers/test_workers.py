"""Worker processes (workers > 1) through the real forwarder: the master's gate opens and
closes the port for all of them, their connections and counters show in the master's
/status and /metrics, their passive failures reach the master's verdict, a dead worker is
replaced, SIGTERM lets their splices finish, and a reload reaches them."""

from __future__ import annotations

import json
import os
import signal
import socket
import urllib.request
from typing import Any

from ..helpers import (
    EchoBackend,
    HungBackend,
    SmtpBackend,
    connect_result,
    forwarder,
    free_port,
    smtp_reply,
    toml_listener,
    wait_port,
    wait_until,
)


def get(admin: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}{path}", timeout=5) as r:
        return bytes(r.read())


def status(admin: int) -> dict[str, Any]:
    return dict(json.loads(get(admin, "/status")))


def metric(admin: int, line_start: str) -> float:
    for line in get(admin, "/metrics").decode().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def config(port: int, backend: int, admin: int, **kw: Any) -> str:
    top = f'admin = "127.0.0.1:{admin}"\nworkers = 2\n' + kw.pop("top", "")
    return toml_listener(port, backend, top=top, **kw)


def test_workers_carry_the_connections_and_the_master_counts_them() -> None:
    port, admin = free_port(), free_port()
    with EchoBackend() as be, \
            forwarder(config(port, be.port, admin, mode="tcp", probe="tcp")) as fw:
        fw.wait_event("workers.started")
        wait_port("127.0.0.1", port, "open", 10)
        st = status(admin)
        pids = {w["pid"] for w in st["workers"]}
        assert len(pids) == 2 and all(w["alive"] for w in st["workers"])
        spliced = 'forwarder_connections_total{listener="smtp",outcome="spliced"}'
        # wait_port's one successful connect is spliced too: count from it
        wait_until(lambda: metric(admin, spliced) == 1, 5, "wait_port's knock to be counted")
        before = 1
        held = []
        for i in range(20):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            c.sendall(b"hello %d\n" % i)
            assert c.recv(100) == b"hello %d\n" % i
            held.append(c)
        wait_until(lambda: status(admin)["listeners"][0]["connections_active"] == 20, 5,
                   "20 active connections in /status")
        by_worker = [w["connections_active"] for w in status(admin)["workers"]]
        assert sum(by_worker) == 20, by_worker  # the workers hold them, not the master
        for c in held:
            c.close()
        wait_until(lambda: metric(admin, spliced) == before + 20, 5, "20 more spliced")
        assert metric(admin, 'forwarder_connections_active{listener="smtp"}') == 0


def test_the_masters_gate_opens_and_closes_the_port_for_all_workers() -> None:
    port, admin = free_port(), free_port()
    be = SmtpBackend().start()
    try:
        with forwarder(config(port, be.port, admin)) as fw:
            fw.wait_event("workers.started")
            wait_port("127.0.0.1", port, "open", 10)
            for _ in range(10):
                with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                    assert smtp_reply(c).startswith(b"220 ")
            be.stop()
            fw.wait_event("gate.closed", reason="probe")
            assert connect_result("127.0.0.1", port) == "refused"
            be = SmtpBackend(port=be.port).start()
            mark = fw.mark()
            fw.wait_event("gate.open", since=mark)
            for _ in range(10):
                with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                    assert smtp_reply(c).startswith(b"220 ")
    finally:
        be.stop()


def test_a_workers_passive_failure_reaches_the_masters_verdict() -> None:
    """A hung backend seen only by real traffic (probes every 30 s): the worker's greeting
    deadline passes, the master counts the failure and declares the backend down."""
    port, admin = free_port(), free_port()
    with HungBackend() as be:
        cfg = config(port, be.port, admin, probe="tcp", interval=30,
                     extra="greeting_timeout = 0.3\n")
        with forwarder(cfg) as fw:
            fw.wait_event("gate.open")
            fw.wait_event("workers.started")
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                assert smtp_reply(c).startswith(b"421 ")
            fw.wait_event("backend.passive_failure", reason="greeting")
            fw.wait_event("backend.state", state="down")
            assert metric(admin, "forwarder_backend_passive_failures_total{backend="
                                 f'"127.0.0.1:{be.port}",reason="greeting"}}') == 1


def test_a_dead_worker_is_replaced_and_service_goes_on() -> None:
    port, admin = free_port(), free_port()
    with SmtpBackend() as be, forwarder(config(port, be.port, admin)) as fw:
        fw.wait_event("workers.started")
        wait_port("127.0.0.1", port, "open", 10)
        victim = status(admin)["workers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        ev = fw.wait_event("workers.exited")
        assert ev["pid"] == victim and ev["code"] == -9
        wait_until(lambda: status(admin)["workers"][0]["pid"] not in (0, victim)
                   and status(admin)["workers"][0]["alive"], 10, "a new worker 0")
        assert status(admin)["workers"][0]["restarts"] == 1
        assert metric(admin, 'forwarder_internal_errors_total{task="worker"}') == 1
        for _ in range(10):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                assert smtp_reply(c).startswith(b"220 ")


def test_sigterm_lets_a_workers_splice_finish() -> None:
    port, admin = free_port(), free_port()
    with EchoBackend() as be, \
            forwarder(config(port, be.port, admin, mode="tcp", probe="tcp")) as fw:
        wait_port("127.0.0.1", port, "open", 10)
        fw.wait_event("workers.started")
        c = socket.create_connection(("127.0.0.1", port), timeout=10)
        c.sendall(b"before")
        assert c.recv(100) == b"before"
        fw.signal(signal.SIGTERM)
        fw.wait_event("gate.closed", reason="shutdown")
        c.sendall(b"during the drain")
        c.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := c.recv(100):
            got += chunk
        assert got == b"during the drain"
        c.close()
        assert fw.proc is not None and fw.proc.wait(10) == 0
        assert fw.wait_event("forwarder.stopped")["cut"] == 0


def test_reload_reaches_the_workers() -> None:
    """A second listener added by SIGHUP is accepted on by the workers."""
    port, port2, admin = free_port(), free_port(), free_port()
    with SmtpBackend() as be, forwarder(config(port, be.port, admin)) as fw:
        fw.wait_event("workers.started")
        wait_port("127.0.0.1", port, "open", 10)
        second = toml_listener(port2, be.port, name="second").split("[[listener]]", 1)[1]
        fw.config_path.write_text(config(port, be.port, admin) + "[[listener]]" + second)
        mark = fw.mark()
        fw.signal(signal.SIGHUP)
        fw.wait_event("reload.listener_added", since=mark)
        wait_port("127.0.0.1", port2, "open", 10)
        with socket.create_connection(("127.0.0.1", port2), timeout=5) as c:
            assert smtp_reply(c).startswith(b"220 ")
        # wait_port's knock and ours
        wait_until(lambda: metric(admin, 'forwarder_connections_total{listener="second",'
                                         'outcome="spliced"}') == 2, 5, "the worker's count")
