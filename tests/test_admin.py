"""Admin endpoint: /metrics, /healthz, /readyz, /status, drain/resume, `forwarder status`."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from typing import Any

from .helpers import (
    SmtpBackend,
    connect_result,
    forwarder,
    free_port,
    run_cli,
    toml_listener,
    wait_port,
)


def http(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


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
    port, admin = free_port(), free_port()
    with SmtpBackend() as be, \
            forwarder(toml_listener(port, be.port, top=f'admin = "127.0.0.1:{admin}"')) as fw:
        fw.wait_event("admin.listening")
        for payload in (b"\0" * 100 + b"\r\n\r\n", b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
                        b"NONSENSE\r\n\r\n", b"", b"GET /status HTTP/1.1\r\n"):
            with socket.create_connection(("127.0.0.1", admin), timeout=10) as s:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                s.settimeout(10)
                data = s.recv(100)
                assert data == b"" or data.startswith(b"HTTP/1.1 4"), data
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
            out = subprocess.run([*curl, f"{base}/drain", "POST"], capture_output=True,
                                 text=True, timeout=20)
            assert out.stdout.strip() == "403", out.stderr
            assert connect_result("127.0.0.1", port) == "open"
        finally:
            delete_link(host_if)
