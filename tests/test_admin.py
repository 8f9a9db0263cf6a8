"""Admin endpoint: /metrics, /healthz, /readyz, /status, drain/resume, `forwarder status`,
and the admin server's limits at their defaults, against the real forwarder (as root, that
is after its drop to nobody).  tests/test_admin_server.py covers the server in-process."""

from __future__ import annotations

import json
import re
import socket
import statistics
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from forwarder.ops.admin import LIMITS

from .helpers import (
    IS_ROOT,
    Forwarder,
    SmtpBackend,
    connect_result,
    forwarder,
    free_port,
    run_cli,
    toml_listener,
    wait_port,
    wait_until,
)


def http(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send `data`, read until the server closes (one request per connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return read_to_eof(s, timeout)


def read_to_eof(s: socket.socket, timeout: float = 10.0) -> bytes:
    s.settimeout(timeout)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def code_of(resp: bytes) -> int:
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", resp)
    assert m, resp[:100]
    return int(m.group(1))


def status(port: int) -> dict[str, Any]:
    code, body = http(port, "/status")
    assert code == 200
    return dict(json.loads(body))


def test_endpoints_follow_the_gate_and_drain_resume() -> None:
    port, admin = free_port(), free_port()
    with SmtpBackend() as be, \
            forwarder(toml_listener(port, be.port, top=f'admin = "127.0.0.1:{admin}"')) as fw:
        fw.wait_event("admin.listening")
        wait_port("127.0.0.1", port, "open", 10)
        assert http(admin, "/healthz") == (200, b"ok\n")
        assert http(admin, "/readyz")[0] == 200
        st = status(admin)
        lst = st["listeners"][0]
        assert lst["gate"]["state"] == "open"
        assert lst["backends"][0]["up"] is True
        assert lst["backends"][0]["history"][0]["result"] == "success"
        assert st["fds"] > 0 and st["tasks"] > 0
        code, body = http(admin, "/metrics")
        assert code == 200 and b'forwarder_gate_open{listener="smtp"} 1.0' in body

        # drain: the gate closes for maintenance although the backend is fine
        assert http(admin, "/drain", "GET")[0] == 405
        code, body = http(admin, "/drain", "POST")
        assert code == 200 and json.loads(body) == {"drain": ["smtp"]}
        assert connect_result("127.0.0.1", port) == "refused"
        assert http(admin, "/readyz")[0] == 503
        assert status(admin)["listeners"][0]["gate"]["drained"] is True
        assert http(admin, "/drain?listener=nope", "POST")[0] == 404
        code, _ = http(admin, "/resume", "POST")
        assert code == 200
        wait_port("127.0.0.1", port, "open", 5)
        _, body = http(admin, "/metrics")
        drained = b'{listener="smtp",reason="drain",state="closed"} 1.0'
        assert b"forwarder_gate_transitions_total" + drained in body

        # `forwarder status` renders the same
        r = run_cli("status", "--admin", f"127.0.0.1:{admin}")
        assert r.returncode == 0, r.stderr
        assert "gate open" in r.stdout and f"UP   127.0.0.1:{be.port}" in r.stdout


def test_status_cli_without_forwarder_fails_cleanly() -> None:
    r = run_cli("status", "--admin", f"127.0.0.1:{free_port()}")
    assert r.returncode == 1 and "cannot reach" in r.stderr


def test_garbage_on_the_admin_port_does_not_hurt() -> None:
    """Each payload gets its 4xx, or a close when it ended before its head did.  (aiohttp
    answers an unparseable request in HTTP/1.0, the version such a request did not state.)"""
    port, admin = free_port(), free_port()
    with SmtpBackend() as be, \
            forwarder(toml_listener(port, be.port, top=f'admin = "127.0.0.1:{admin}"')) as fw:
        fw.wait_event("admin.listening")
        for payload, want in ((b"\0" * 100 + b"\r\n\r\n", 400),
                              (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", 413),
                              (b"NONSENSE\r\n\r\n", 400), (b"", None),
                              (b"GET /status HTTP/1.1\r\n", None)):
            with socket.create_connection(("127.0.0.1", admin), timeout=10) as s:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                s.settimeout(10)
                data = s.recv(100)
                if want is None:
                    assert data == b"", data
                else:
                    assert code_of(data) == want, (payload[:20], data)
        assert http(admin, "/healthz") == (200, b"ok\n")
        assert fw.proc is not None and fw.proc.poll() is None


def test_drain_is_refused_from_a_non_loopback_peer() -> None:
    """Admin bound to all addresses (so a remote Prometheus can scrape): /metrics answers
    a peer in another namespace, /drain from there is 403 and changes nothing."""
    from .conftest import need_root, need_tool
    from .netns import delete_link, namespaces, unique, veth

    need_root()
    need_tool("ip")
    port, admin = free_port(), free_port()
    ns = unique("fwadm")
    host_if = unique("fwa")
    with SmtpBackend() as be, namespaces(ns) as nss, \
            forwarder(toml_listener(port, be.port, top=f'admin = "0.0.0.0:{admin}"')) as fw:
        try:
            veth(host_if, unique("fwb"), None, "10.231.7.1/30", ns, "10.231.7.2/30")
            fw.wait_event("gate.open")
            curl = [*nss[ns].exec(), "python3", "-c",
                    "import sys,urllib.request as u\n"
                    "r=u.Request(sys.argv[1],method=sys.argv[2])\n"
                    "try:\n print(u.urlopen(r,timeout=5).status)\n"
                    "except u.HTTPError as e:\n print(e.code)\n"]
            import subprocess
            base = f"http://10.231.7.1:{admin}"
            out = subprocess.run([*curl, f"{base}/metrics", "GET"], capture_output=True,
                                 text=True, timeout=20)
            assert out.stdout.strip() == "200", out.stderr
            for path in ("/drain", "/resume", "/drain?listener=smtp"):
                out = subprocess.run([*curl, f"{base}{path}", "POST"], capture_output=True,
                                     text=True, timeout=20)
                assert out.stdout.strip() == "403", out.stderr
            fw.wait_event("admin.forbidden", path="/drain", peer="10.231.7.2")
            assert connect_result("127.0.0.1", port) == "open"
            fw.read_events()
            assert not [e for e in fw.events if e.get("event") in ("admin.drain", "admin.resume")]
        finally:
            delete_link(host_if)


def test_head_404_and_bare_newlines_as_the_new_user_found_them() -> None:
    """HEAD sends no body; an unknown path is 404 whatever the method (405 is for a known
    path); a head ending in a bare "\\n\\n" is answered at once, not at the read timeout."""
    port, admin = free_port(), free_port()
    with SmtpBackend() as be, \
            forwarder(toml_listener(port, be.port, top=f'admin = "127.0.0.1:{admin}"')) as fw:
        fw.wait_event("admin.listening")
        for path in ("/metrics", "/healthz", "/status"):
            resp = raw(admin, f"HEAD {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            head, body = resp.split(b"\r\n\r\n", 1)
            assert code_of(resp) == 200 and body == b"", (path, resp[-60:])
            assert int(re.findall(rb"Content-Length: (\d+)", head)[0]) > 0
        for method in ("POST", "PUT", "DELETE", "GET"):
            assert http(admin, "/nope", method)[0] == 404, method
        assert http(admin, "/metrics", "POST")[0] == 405
        assert http(admin, "/resume", "GET")[0] == 405
        with socket.create_connection(("127.0.0.1", admin), timeout=10) as s:
            t0 = time.monotonic()
            s.sendall(b"GET /healthz HTTP/1.1\n\n")  # and the write side stays open
            resp = read_to_eof(s)
        took = time.monotonic() - t0
        assert code_of(resp) == 400 and b"Expected CRLF" in resp, resp
        assert took < 1.0 < LIMITS.read_timeout, took


def test_a_huge_head_or_body_is_413_and_changes_nothing() -> None:
    port, admin = free_port(), free_port()
    with SmtpBackend() as be, \
            forwarder(toml_listener(port, be.port, top=f'admin = "127.0.0.1:{admin}"')) as fw:
        fw.wait_event("gate.open")
        host = b"Host: t\r\n"
        url = b"/" + b"a" * 9000
        assert code_of(raw(admin, b"GET " + url + b" HTTP/1.1\r\n" + host + b"\r\n")) == 413
        block = b"".join(b"X-%d: %s\r\n" % (i, b"y" * 1000) for i in range(20))
        assert code_of(raw(admin, b"GET /healthz HTTP/1.1\r\n" + host + block + b"\r\n")) == 413
        resp = raw(admin, b"POST /drain HTTP/1.1\r\n" + host + b"Content-Length: 10000000\r\n\r\n")
        assert code_of(resp) == 413
        assert http(admin, "/readyz")[0] == 200
        assert connect_result("127.0.0.1", port) == "open"


def _scrape_time(admin: int) -> float:
    t0 = time.monotonic()
    resp = raw(admin, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n", timeout=5)
    took = time.monotonic() - t0
    assert code_of(resp) == 200 and b"forwarder_gate_open" in resp
    return took


def test_slowloris_clients_neither_delay_metrics_nor_stay() -> None:
    """200 clients that never finish their head: /metrics still answers in < 50 ms while
    they hang on, and each is cut at the read timeout (5 s from its accept), not before."""
    port, admin = free_port(), free_port()
    with SmtpBackend() as be, \
            forwarder(toml_listener(port, be.port, top=f'admin = "127.0.0.1:{admin}"')) as fw:
        fw.wait_event("admin.listening")
        _scrape_time(admin)  # warm
        slow: list[tuple[socket.socket, float]] = []
        try:
            for _ in range(200):
                s = socket.create_connection(("127.0.0.1", admin), timeout=10)
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\nX-Slow: ")
                slow.append((s, time.monotonic()))
            times = [_scrape_time(admin) for _ in range(5)]
            assert statistics.median(times) < 0.05, times
            # they are all still there: nothing cut them early
            assert time.monotonic() - slow[0][1] < LIMITS.read_timeout - 1
            for s, _ in slow:
                s.setblocking(False)
                try:
                    assert s.recv(1) != b"", "cut before the read timeout"
                except BlockingIOError:
                    pass
            cut = []
            for s, t0 in slow:
                s.setblocking(True)
                s.settimeout(max(0.1, t0 + LIMITS.read_timeout + 5 - time.monotonic()))
                try:
                    first = s.recv(100)  # a close, or a 408 and then the close
                    if first:
                        assert code_of(first) == 408, first
                        read_to_eof(s, 5)
                except ConnectionResetError:
                    pass
                cut.append(time.monotonic() - t0)
            assert LIMITS.read_timeout - 0.5 < min(cut) and max(cut) < LIMITS.read_timeout + 5
        finally:
            for s, _ in slow:
                s.close()
        assert _scrape_time(admin) < 1


def test_the_admin_port_caps_its_connections() -> None:
    """256 open connections (far above what scrapers and people need, far below the
    descriptors the relay has): the 257th is closed as soon as it is accepted, the 256 are
    still served, and when they are gone there is room again."""
    port, admin = free_port(), free_port()
    assert LIMITS.connections == 256
    with SmtpBackend() as be, \
            forwarder(toml_listener(port, be.port, top=f'admin = "127.0.0.1:{admin}"')) as fw:
        fw.wait_event("admin.listening")
        held = [socket.create_connection(("127.0.0.1", admin), timeout=10) for _ in range(256)]
        try:
            with socket.create_connection(("127.0.0.1", admin), timeout=10) as extra:
                t0 = time.monotonic()
                assert read_to_eof(extra, 3) == b""
                assert time.monotonic() - t0 < 1
            fw.wait_event("admin.full", connections=256)
            held[-1].sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_to_eof(held[-1]).endswith(b"\r\n\r\nok\n")
        finally:
            for s in held:
                s.close()

        def served() -> bool:
            try:
                return http(admin, "/healthz") == (200, b"ok\n")
            except OSError:
                return False

        wait_until(served, 10, "the admin port to serve again")
        fw.wait_event("admin.not_full")
        assert connect_result("127.0.0.1", port) == "open"


def test_every_endpoint_works_after_the_privilege_drop() -> None:
    """As root the forwarder drops to nobody, who may not read this Python installation:
    whatever aiohttp imports lazily must have been imported before.  Every path through the
    server runs after the drop, and nothing is printed outside the JSON log (aiohttp's own
    logging would print tracebacks to stderr)."""
    if not IS_ROOT:
        pytest.skip("needs root to drop privileges")
    port, admin = free_port(), free_port()
    with SmtpBackend() as be, \
            Forwarder(toml_listener(port, be.port, top=f'admin = "127.0.0.1:{admin}"')) as fw:
        assert fw.wait_event("privileges.dropped")["user"] == "nobody"
        fw.wait_event("gate.open")
        with open(f"/proc/{fw.pid}/status") as f:
            assert re.search(r"^Uid:\s+65534\s", f.read(), re.M)
        host = b"Host: t\r\n"
        for req, want in (
                (b"GET /metrics HTTP/1.1\r\n" + host, 200),
                (b"HEAD /metrics HTTP/1.1\r\n" + host, 200),
                (b"GET /healthz HTTP/1.0\r\n", 200),
                (b"GET /readyz HTTP/1.1\r\n" + host, 200),
                (b"GET /status HTTP/1.1\r\n" + host, 200),
                (b"GET / HTTP/1.1\r\n" + host, 200),
                (b"HEAD / HTTP/1.1\r\n" + host, 200),
                (b"GET /events?since=1 HTTP/1.1\r\n" + host, 200),
                (b"GET /events?since=x HTTP/1.1\r\n" + host, 400),
                (b"POST /drain?listener=smtp HTTP/1.1\r\n" + host + b"Accept: text/html\r\n"
                 b"Origin: http://t\r\n", 403),
                (b"POST /drain?listener=smtp HTTP/1.1\r\n" + host, 200),
                (b"GET /readyz HTTP/1.1\r\n" + host, 503),
                (b"POST /resume?listener=smtp HTTP/1.1\r\nContent-Length: 2\r\n" + host
                 + b"\r\nok", 200),
                (b"POST /drain?listener=nope HTTP/1.1\r\n" + host, 404),
                (b"GET /nope?x=%C3%BC HTTP/1.1\r\nHost: b\xc3\xbccher.example\r\n", 404),
                (b"GET /healthz HTTP/1.1\r\nHost: xn--bcher-kva.example\r\n", 200),
                (b"GET /drain HTTP/1.1\r\n" + host, 405),
                (b"GET /healthz HTTP/1.1\r\n" + host + b"X: " + b"y" * 9000 + b"\r\n", 413),
                (b"GET /healthz HTTP/1.1\r\n" + host + b"Accept-Encoding: gzip, br\r\n", 200),
                (b"POST /drain HTTP/1.1\r\n" + host + b"Transfer-Encoding: chunked\r\n", 413),
                (b"GET /healthz HTTP/1.1\r\n" + host + b"Connection: Upgrade\r\n"
                 b"Upgrade: websocket\r\n", 200),
                (b"BREW /pot HTCPCP/1.0\r\n", 400),
        ):
            resp = raw(admin, req if req.endswith(b"ok") else req + b"\r\n")
            assert code_of(resp) == want, (req[:40], resp[:200])
        with socket.create_connection(("127.0.0.1", admin), timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\n\n")
            assert code_of(read_to_eof(s)) == 400
        assert fw.proc is not None and fw.proc.poll() is None
        fw.read_events()
        bad = [e for e in fw.events if e.get("event") in ("_raw", "admin.error")]
        assert not bad, bad[:3]
