"""Health that knows what "alive" means (issue 13), through the real forwarder: the
adaptive greeting deadline, waiters released at a down verdict, checks of every kind
deciding the gate (agent drain, James's /healthcheck, several checks per backend), and a
drain that survives SIGHUP and a restart."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .helpers import (
    Forwarder,
    SmtpBackend,
    _ThreadServer,
    connect_result,
    forwarder,
    free_port,
    smtp_reply,
    toml_listener,
    wait_port,
)


class Switchable(_ThreadServer):
    """An SMTP-ish backend whose behaviour the test switches: greet at once, greet after
    `delay` seconds, or hang (accept and never say a word)."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.mode = "greet"
        self.delay = delay

    def handle(self, conn: socket.socket) -> None:
        mode = self.mode
        if mode == "hang":
            conn.settimeout(0.2)
            while not self._stop.is_set():
                try:
                    if not conn.recv(4096):
                        return
                except TimeoutError:
                    continue
            return
        if self.delay and self._stop.wait(self.delay):
            return
        conn.sendall(b"220 switchable ready\r\n")
        conn.settimeout(10)
        buf = b""
        while data := conn.recv(4096):
            buf += data
            while b"\r\n" in buf:
                line, buf = buf.split(b"\r\n", 1)
                if line.upper().startswith(b"QUIT"):
                    conn.sendall(b"221 bye\r\n")
                    return
                conn.sendall(b"250 ok\r\n")


class Agent(_ThreadServer):
    """An agent-check sidecar: answers one line, `word`, per connection."""

    word = "up"

    def handle(self, conn: socket.socket) -> None:
        conn.sendall(self.word.encode() + b"\n")


class JamesHealth:
    """A small server speaking James webadmin's /healthcheck contract."""

    def __init__(self) -> None:
        self.status = "healthy"
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                st = outer.status
                body = json.dumps({"status": st, "checks": [
                    {"componentName": "Cassandra backend", "escapedComponentName":
                     "Cassandra%20backend", "status": st,
                     "cause": None if st == "healthy" else "timeout"}]}).encode()
                self.send_response(503 if st == "unhealthy" else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> JamesHealth:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def status(admin: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=5) as r:
        return dict(json.load(r))


def post(admin: int, path: str) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{admin}{path}", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


def greeting_seconds(port: int) -> tuple[bytes, float]:
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=15) as c:
        reply = smtp_reply(c, timeout=15)
    return reply, time.monotonic() - t0


def oneliner(port: int, backend: int, admin: int, *extra: str) -> list[str]:
    return ["--listen", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{backend}",
            "--probe", "smtp", "--mode", "smtp", "--admin", f"127.0.0.1:{admin}", *extra]


def test_adaptive_deadline_a_fast_greeter_that_hangs_gets_its_client_a_421_in_under_1_5s(
        ) -> None:
    port, admin = free_port(), free_port()
    with Switchable() as be, \
            Forwarder(args=oneliner(port, be.port, admin, "--interval", "30")) as fw:
        fw.wait_event("gate.open")
        st = status(admin)["listeners"][0]["backends"][0]["greeting_deadline"]
        assert st["mode"] == "auto" and st["samples"] >= 1 and st["seconds"] == 1.0
        be.mode = "hang"  # hangs just before the message; the next probe is 30 s away
        reply, took = greeting_seconds(port)
        assert reply.startswith(b"421 4.3.2 "), reply
        assert took < 1.5, f"421 after {took:.2f}s"


def test_adaptive_deadline_a_backend_that_greets_after_3s_is_not_cut_off() -> None:
    """Sendmail's greet_pause style: the deadline learned from it is capped at 10 s."""
    port, admin = free_port(), free_port()
    with Switchable(delay=3.0) as be:
        cfg = toml_listener(port, be.port, top=f'admin = "127.0.0.1:{admin}"',
                            interval=30, probe_timeout=6.0)
        with forwarder(cfg) as fw:
            fw.wait_event("gate.open", timeout=20)
            deadline = status(admin)["listeners"][0]["backends"][0]["greeting_deadline"]
            assert deadline["seconds"] == 10.0, deadline
            reply, took = greeting_seconds(port)
            assert reply == b"220 switchable ready\r\n"
            assert 2.9 < took < 6


def test_waiters_are_released_at_the_down_verdict() -> None:
    """A fixed 10 s deadline, a backend that hangs: the clients waiting on it get their
    421 when the probe declares it down, not 10 s later."""
    port = free_port()
    with Switchable() as be:
        cfg = toml_listener(port, be.port, interval=0.3, probe_timeout=0.5,
                            extra="greeting_timeout = 10\n")
        with forwarder(cfg) as fw:
            fw.wait_event("gate.open")
            be.mode = "hang"
            reply, took = greeting_seconds(port)
            assert reply.startswith(b"421 "), reply
            assert took < 3, f"421 after {took:.2f}s (greeting_timeout is 10 s)"
            down = fw.wait_event("backend.state", state="down")
            assert down


def test_agent_drain_closes_the_gate_while_a_live_splice_goes_on() -> None:
    port = free_port()
    with SmtpBackend() as be, Agent() as agent:
        cfg = toml_listener(port, be.port, probe_extra=f"""
[[listener.probe.checks]]
kind = "agent"
port = {agent.port}
""")
        with forwarder(cfg) as fw:
            fw.wait_event("gate.open")
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            assert smtp_reply(c).startswith(b"220 ")
            mark = fw.mark()
            agent.word = "drain"
            fw.wait_event("gate.closed", since=mark, reason="backend_drain")
            assert connect_result("127.0.0.1", port) == "refused"
            c.sendall(b"NOOP\r\n")  # the live session is untouched
            assert smtp_reply(c).startswith(b"250")
            c.sendall(b"QUIT\r\n")
            c.close()
            mark = fw.mark()
            agent.word = "up 100%"
            fw.wait_event("gate.open", since=mark)


def test_james_healthcheck_unhealthy_is_down_and_degraded_drains() -> None:
    """The seed's backend: James greets while its storage is down; its webadmin says so."""
    port, admin = free_port(), free_port()
    with SmtpBackend() as be, JamesHealth() as james:
        cfg = toml_listener(port, be.port, top=f'admin = "127.0.0.1:{admin}"',
                            probe_extra=f"""
[[listener.probe.checks]]
name = "james"
kind = "http"
url = "http://127.0.0.1:{james.port}/healthcheck"
degraded = "drain"
""")
        with forwarder(cfg) as fw:
            fw.wait_event("gate.open")
            mark = fw.mark()
            james.status = "unhealthy"
            fw.wait_event("gate.closed", since=mark, reason="probe")
            b = status(admin)["listeners"][0]["backends"][0]
            names = [c["name"] for c in b["checks"]]
            assert names == ["smtp", "james"]
            last = b["checks"][1]["history"][0]
            assert not last["ok"] and "Cassandra backend" in last["detail"]
            assert b["checks"][0]["history"][0]["ok"]  # it still greets
            mark = fw.mark()
            james.status = "degraded"
            fw.wait_event("backend.drain", since=mark)
            assert connect_result("127.0.0.1", port) == "refused"
            mark = fw.mark()
            james.status = "healthy"
            fw.wait_event("gate.open", since=mark)
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
                text = r.read().decode()
            assert (f'forwarder_probes_total{{backend="127.0.0.1:{be.port}",check="james",'
                    'result="failure"}') in text


def test_drain_survives_sighup_and_a_restart() -> None:
    port, admin = free_port(), free_port()
    # the forwarder writes it after dropping to nobody (as systemd's StateDirectory= would
    # give it a directory of its own)
    d = Path(tempfile.mkdtemp(prefix="fwstate-"))
    d.chmod(0o777)
    state = d / "state.json"
    try:
        with SmtpBackend() as be:
            cfg = toml_listener(port, be.port, top=f'admin = "127.0.0.1:{admin}"\n'
                                                   f'state_file = "{state}"')
            with forwarder(cfg) as fw:
                fw.wait_event("gate.open")
                assert post(admin, "/drain") == 200
                assert json.loads(state.read_text()) == {"drained": ["smtp"]}
                mark = fw.mark()
                fw.signal(signal.SIGHUP)
                fw.wait_event("reload.done", since=mark)
                assert status(admin)["listeners"][0]["gate"]["drained"] is True
                assert connect_result("127.0.0.1", port) == "refused"
            with forwarder(cfg) as fw:  # a restart during maintenance
                fw.wait_event("state.drain_restored")
                b = fw.wait_event("backend.state", state="up")
                assert b
                st = status(admin)["listeners"][0]["gate"]
                assert st["state"] == "closed" and st["drained"] is True
                assert connect_result("127.0.0.1", port) == "refused"
                assert post(admin, "/resume") == 200
                wait_port("127.0.0.1", port, "open", 10)
                assert json.loads(state.read_text()) == {"drained": []}
            assert not (d / "state.json.tmp").exists()
    finally:
        shutil.rmtree(d)
