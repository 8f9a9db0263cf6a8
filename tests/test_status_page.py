"""The status page (GET /), /events and `forwarder status --events` against the real
forwarder: the page in headless Chromium (its DOM before and after a backend dies, a
screenshot, its buttons clicked), the history of a kill and a restart, the form POST from
loopback and from another namespace, and the latency of / and /events while 1,000
connections are held open through the forwarder.  tests/test_admin_server.py covers the
page's escaping, its CSP and the browser rules in-process."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from .conftest import need_root, need_tool
from .helpers import (
    ROOT,
    SmtpBackend,
    connect_result,
    forwarder,
    free_port,
    run_cli,
    toml_listener,
    wait_port,
    wait_until,
)

CONNECTIONS = 1000
WITHIN = 0.050  # s: the page and /events, median of several, with CONNECTIONS open


def get(port: int, path: str, headers: dict[str, str] | None = None,
        method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def status(admin: int) -> dict[str, Any]:
    code, _, body = get(admin, "/status")
    assert code == 200
    return dict(json.loads(body))


def events(admin: int, since: int = 0) -> list[dict[str, Any]]:
    code, _, body = get(admin, f"/events?since={since}")
    assert code == 200, body
    return list(json.loads(body))


class Dom(HTMLParser):
    """What the page says in its data attributes: gates by listener, states by backend,
    event kinds in order (newest first, as shown)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.gates: dict[str, str] = {}
        self.backends: dict[str, str] = {}
        self.kinds: list[str] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("data-listener") and a.get("data-gate"):
            self.gates[str(a["data-listener"])] = str(a["data-gate"])
        if a.get("data-backend") and a.get("data-state"):
            self.backends[str(a["data-backend"])] = str(a["data-state"])
        if tag == "tr" and a.get("data-kind"):
            self.kinds.append(str(a["data-kind"]))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def two_backends(port: int, admin: int, up: int, down: int) -> str:
    """gate = "any": open while either backend is up."""
    return f"""
admin = "127.0.0.1:{admin}"
drain_timeout = 5
[[listener]]
name = "smtp"
address = "127.0.0.1"
port = {port}
gate = "any"
[[listener.backends]]
address = "127.0.0.1:{up}"
[[listener.backends]]
address = "127.0.0.1:{down}"
[listener.probe]
kind = "smtp"
interval = 0.2
fast_interval = 0.05
timeout = 1
rise = 1
fall = 1
jitter = 0.0
"""


def test_the_page_in_chromium_shows_the_gate_and_both_backends_and_follows_a_death(
        tmp_path: Path) -> None:
    need_tool("chromium")
    from . import chromium

    port, admin, dead = free_port(), free_port(), free_port()
    live = SmtpBackend().start()
    try:
        with forwarder(two_backends(port, admin, live.port, dead)) as fw:
            fw.wait_event("gate.open")
            fw.wait_event("probe.failed", backend=f"127.0.0.1:{dead}")
            url = f"http://127.0.0.1:{admin}/"
            dom = Dom(chromium.dump_dom(url))
            assert dom.gates == {"smtp": "open"}
            assert dom.backends == {f"127.0.0.1:{live.port}": "up",
                                    f"127.0.0.1:{dead}": "down"}
            text = " ".join(dom.text)
            assert "OPEN" in text and "UP" in text and "DOWN" in text
            assert "connection refused" in text  # the dead one's last probe, as it failed
            assert "gate.open" in dom.kinds and "backend.up" in dom.kinds
            shot = chromium.screenshot(url, tmp_path / "status-page.png", 1200, 1600)
            print(f"screenshot: {shot}")
            data = shot.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # not a blank page

            mark = fw.mark()
            live.stop()  # the backend that was up dies: both down, the gate closes
            fw.wait_event("gate.closed", since=mark)
            after = Dom(chromium.dump_dom(url))
            assert after.gates == {"smtp": "closed"}
            assert after.backends == {f"127.0.0.1:{live.port}": "down",
                                      f"127.0.0.1:{dead}": "down"}
            assert after.kinds[:2] == ["gate.closed", "backend.down"], after.kinds
    finally:
        live.stop()


def test_the_buttons_drain_and_resume_in_a_browser_and_another_site_cannot_press_them(
        ) -> None:
    """Clicked in Chromium (over the DevTools protocol): Drain posts the form, the answer
    brings the browser back to the page, which shows the gate drained and a Resume button;
    Resume opens it again.  The same form on a page of another origin is refused.  And the
    page reloads itself under its own CSP."""
    need_tool("chromium")
    from . import chromium

    port, admin = free_port(), free_port()
    with SmtpBackend() as be, \
            forwarder(toml_listener(port, be.port, top=f'admin = "127.0.0.1:{admin}"')) as fw:
        fw.wait_event("gate.open")
        base = f"http://127.0.0.1:{admin}/"

        async def click() -> None:
            async with chromium.browser() as b:
                page = await b.new_page(base)
                await page.click("form[action='drain?listener=smtp'] button")
                assert await page.location() == base  # 303 back to the page
                dom = Dom(await page.html())
                assert dom.gates == {"smtp": "closed"}
                assert "drained by the operator" in " ".join(dom.text)
                assert status(admin)["listeners"][0]["gate"]["drained"] is True
                assert connect_result("127.0.0.1", port) == "refused"

                await page.click("form[action='resume?listener=smtp'] button")
                assert await page.location() == base
                wait_port("127.0.0.1", port, "open", 10)
                assert status(admin)["listeners"][0]["gate"]["drained"] is False

                # another site's page posting the same form: refused, nothing drained
                await page.goto("data:text/html,<form method=post action='"
                                f"{base}drain?listener=smtp'><button>go</button></form>")
                await page.click("button")
                assert "refused from another site" in await page.html()
                assert status(admin)["listeners"][0]["gate"]["drained"] is False

                # the refresh runs (its hash is in the CSP): a load with no click
                await page.goto(base + "?refresh=2")
                await page.loaded(timeout=10)

        asyncio.run(asyncio.wait_for(click(), 120))
        fw.wait_event("admin.drain", peer="127.0.0.1")
        fw.wait_event("admin.resume", peer="127.0.0.1")
        forbidden = fw.wait_event("admin.forbidden", path="/drain")
        assert forbidden["reason"] == "Sec-Fetch-Site: cross-site"
        assert connect_result("127.0.0.1", port) == "open"


_FORM_POST = (
    "import sys,urllib.request as u\n"
    "class N(u.HTTPRedirectHandler):\n"
    " def redirect_request(self,*a,**k): return None\n"
    "r=u.Request(sys.argv[1],data=b'',method='POST',headers={"
    "'Content-Type':'application/x-www-form-urlencoded','Accept':'text/html',"
    "'Origin':sys.argv[2],'Sec-Fetch-Site':'same-origin','Sec-Fetch-Mode':'navigate'})\n"
    "try:\n print(u.build_opener(N).open(r,timeout=5).status)\n"
    "except u.HTTPError as e:\n print(e.code, e.headers.get('Location'))\n")


def form_post(url: str, origin: str, prefix: list[str] | None = None) -> str:
    """A browser's form POST (its headers), not following the redirect: the code and the
    Location."""
    out = subprocess.run([*(prefix or []), sys.executable, "-c", _FORM_POST, url, origin],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_form_post_drains_from_loopback_with_a_redirect_and_is_403_from_elsewhere() -> None:
    """Admin bound to every address: from loopback the page's form drains and is sent back
    to the page (303 ./); from a peer in another namespace the same POST is 403 and
    changes nothing."""
    need_root()
    need_tool("ip")
    from .netns import delete_link, namespaces, unique, veth

    port, admin = free_port(), free_port()
    ns, host_if = unique("fwpg"), unique("fwp")
    with SmtpBackend() as be, namespaces(ns) as nss, \
            forwarder(toml_listener(port, be.port, top=f'admin = "0.0.0.0:{admin}"')) as fw:
        try:
            veth(host_if, unique("fwq"), None, "10.231.9.1/30", ns, "10.231.9.2/30")
            fw.wait_event("gate.open")
            remote = f"http://10.231.9.1:{admin}"
            for path in ("/drain?listener=smtp", "/resume?listener=smtp"):
                got = form_post(remote + path, remote, nss[ns].exec())
                assert got.startswith("403"), got
            fw.wait_event("admin.forbidden", path="/drain", peer="10.231.9.2")
            assert connect_result("127.0.0.1", port) == "open"
            assert status(admin)["listeners"][0]["gate"]["drained"] is False

            local = f"http://127.0.0.1:{admin}"
            assert form_post(local + "/drain?listener=smtp", local) == "303 ./"
            assert connect_result("127.0.0.1", port) == "refused"
            assert status(admin)["listeners"][0]["gate"]["drained"] is True
            assert form_post(local + "/resume?listener=smtp", local) == "303 ./"
            wait_port("127.0.0.1", port, "open", 10)
        finally:
            delete_link(host_if)


def test_events_record_a_kill_and_a_restart_in_order_with_reasons() -> None:
    """One backend: killed, then restarted on its port.  /events has backend.down then
    gate.closed, backend.up then gate.open, each with its reason; ?since= gives only what
    came after; `forwarder status --events` prints the same in the same order."""
    port, admin = free_port(), free_port()
    be = SmtpBackend().start()
    try:
        with forwarder(toml_listener(port, be.port, top=f'admin = "127.0.0.1:{admin}"')) as fw:
            fw.wait_event("gate.open")
            mark = fw.mark()
            be.stop()
            fw.wait_event("gate.closed", since=mark)
            be = SmtpBackend(port=be.port).start()
            fw.wait_event("gate.open", since=mark)

            evs = events(admin)
            seqs = [e["seq"] for e in evs]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            assert [e["time"] for e in evs] == sorted(e["time"] for e in evs)
            flips = [e for e in evs if e["kind"] in ("backend.up", "backend.down",
                                                    "gate.open", "gate.closed")]
            name = f"127.0.0.1:{be.port}"
            assert [(e["kind"], e.get("backend") or e.get("listener")) for e in flips] == [
                ("backend.up", name), ("gate.open", "smtp"),
                ("backend.down", name), ("gate.closed", "smtp"),
                ("backend.up", name), ("gate.open", "smtp")]
            assert "refused" in flips[2]["reason"]  # why it went down: what the probe saw
            assert flips[4]["reason"].startswith("220")  # why it came back: a greeting
            assert [e["reason"] for e in flips if e["kind"].startswith("gate.")] == [
                "probe"] * 3
            failed = [e for e in evs if e["kind"] == "probe.failed"]
            assert failed and failed[0]["seq"] < flips[2]["seq"]  # the failure before

            down = flips[2]["seq"]
            newer = events(admin, since=down)
            assert newer[0]["seq"] > down
            assert [e["kind"] for e in newer if e["kind"] in ("gate.closed", "gate.open")] \
                == ["gate.closed", "gate.open"]
            assert events(admin, since=seqs[-1]) == []

            r = run_cli("status", "--events", "--admin", f"127.0.0.1:{admin}")
            assert r.returncode == 0, r.stderr
            lines = r.stdout.splitlines()
            print(r.stdout)
            wanted = [("backend.down", name, "refused"), ("gate.closed", "smtp", "probe"),
                      ("backend.up", name, "220"), ("gate.open", "smtp", "probe")]
            at = 0
            for kind, subject, why in wanted:
                hits = [i for i, ln in enumerate(lines) if i >= at and f" {kind} " in ln
                        and f" {subject} " in ln and why in ln]
                assert hits, (kind, r.stdout)
                at = hits[0] + 1
            assert lines[0].split()[2] == "#1"  # oldest first: time, seq, kind, subject, why
            assert any(ln.split()[3] == "forwarder.started" for ln in lines)
            r = run_cli("status", "--events", "--json", "--since", str(down),
                        "--admin", f"127.0.0.1:{admin}")
            assert r.returncode == 0 and json.loads(r.stdout)[0]["seq"] > down
    finally:
        be.stop()


def test_status_events_against_nothing_fails_cleanly() -> None:
    r = run_cli("status", "--events", "--admin", f"127.0.0.1:{free_port()}")
    assert r.returncode == 1 and "cannot reach" in r.stderr and "/events" in r.stderr


def _raise_nofile(want: int) -> int:
    """As far as allowed (root may raise the hard limit); children inherit it."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    for lim in ((want, max(want, hard)), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, lim)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _timed(admin: int, path: str) -> float:
    t0 = time.monotonic()
    code, _, body = get(admin, path)
    took = time.monotonic() - t0
    assert code == 200 and body
    return took


@pytest.mark.timeout(300)
def test_the_page_and_events_answer_within_50_ms_with_1000_connections_open() -> None:
    """1,000 connections relayed and held open, a full history (500 events): GET / and
    GET /events each answer in under 50 ms (median of 11), and the page counts them."""
    from forwarder.ops import history

    limit = _raise_nofile(4 * CONNECTIONS + 1000)
    assert limit >= 3 * CONNECTIONS + 200, f"RLIMIT_NOFILE {limit} is too low"
    port, admin, bport = free_port(), free_port(), free_port()
    echo = subprocess.Popen([sys.executable, "-m", "tests.echoserver", str(bport)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    held: list[socket.socket] = []
    try:
        assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
        cfg = toml_listener(port, bport, mode="tcp", probe="tcp", interval=0.5,
                            top=f'admin = "127.0.0.1:{admin}"',
                            extra="backlog = 2048\nidle_timeout = 600")
        with forwarder(cfg) as fw:
            fw.wait_event("gate.open")
            # fill the history: drains and resumes until it holds all it keeps
            for _ in range(history.SIZE):
                if len(events(admin)) >= history.SIZE:
                    break
                for action in ("drain", "resume"):
                    assert get(admin, f"/{action}", method="POST")[0] == 200
            assert len(events(admin)) == history.SIZE
            wait_port("127.0.0.1", port, "open", 10)
            for i in range(CONNECTIONS):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                held.append(s)
                s.sendall(b"%d\n" % i)
                assert s.recv(16) == b"%d\n" % i  # relayed: the echo came back through it
            # worker processes report their counts every 0.25 s: polled, bounded
            wait_until(lambda: status(admin)["listeners"][0]["connections_active"]
                       == CONNECTIONS, 10, f"/status to count {CONNECTIONS} connections")
            _timed(admin, "/")  # warm
            page = [_timed(admin, "/") for _ in range(11)]
            evs = [_timed(admin, "/events") for _ in range(11)]
            figures = {"connections": CONNECTIONS, "events": history.SIZE,
                       "page_median_ms": round(statistics.median(page) * 1000, 2),
                       "page_max_ms": round(max(page) * 1000, 2),
                       "events_median_ms": round(statistics.median(evs) * 1000, 2),
                       "events_max_ms": round(max(evs) * 1000, 2),
                       "page_bytes": len(get(admin, "/")[2]),
                       "events_bytes": len(get(admin, "/events")[2])}
            print(json.dumps(figures))
            assert statistics.median(page) < WITHIN, figures
            assert statistics.median(evs) < WITHIN, figures
            body = get(admin, "/")[2].decode()
            assert f"live connections <b>{CONNECTIONS}</b>" in body
            assert fw.proc is not None and fw.proc.poll() is None
    finally:
        for s in held:
            s.close()
        echo.terminate()
        echo.wait(10)


def test_the_screenshot_script_writes_a_small_png(tmp_path: Path) -> None:
    """dashboards/screenshot.py (make screenshot) as the README's picture is made."""
    need_tool("chromium")
    out = tmp_path / "status-page.png"
    r = subprocess.run([sys.executable, str(ROOT / "dashboards" / "screenshot.py"),
                        "--out", str(out)], capture_output=True, text=True, timeout=120,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 20_000 < len(data) < 400_000, len(data)
    print(f"screenshot: {out} ({len(data) // 1024} KiB)")

