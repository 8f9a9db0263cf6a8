"""The admin server in-process: `admin.start()` on an event loop of the test's own, in a
thread, standing in for the forwarder's loop, with the test's own `Controls` (the interface
admin.py defines, implemented here: not a stand-in for Service's logic) on loopback sockets.

Small `Limits` make the timeouts and the cap quick to reach; test_admin.py proves the
defaults against the real forwarder.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvloop
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from forwarder.ops import admin, metrics

from .helpers import wait_until

HOST = "127.0.0.1"


class Controls:
    """admin.Controls for a forwarder with listeners `names`; records each call and the
    thread it ran on."""

    def __init__(self, names: tuple[str, ...] = ("smtp", "submission")) -> None:
        self.names = names
        self.why: list[str] = []
        self.extra: dict[str, Any] = {}
        self.fail = False
        self.calls: list[tuple[str, str | None]] = []
        self.threads: set[int] = set()
        self.history: list[dict[str, Any]] = []

    def _note(self, what: str, arg: str | None = None) -> None:
        self.calls.append((what, arg))
        self.threads.add(threading.get_ident())
        if self.fail:
            raise RuntimeError("controls failed on purpose")

    def status(self) -> dict[str, Any]:
        self._note("status")
        return {"listeners": [{"name": n} for n in self.names], **self.extra}

    def readiness(self) -> list[str]:
        self._note("readiness")
        return list(self.why)

    def drain(self, name: str | None) -> list[str]:
        self._note("drain", name)
        return [n for n in self.names if name in (None, n)]

    def resume(self, name: str | None) -> list[str]:
        self._note("resume", name)
        return [n for n in self.names if name in (None, n)]

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        self._note("events", str(since))
        return [e for e in self.history if e["seq"] > since]


class Loop:
    """An event loop running in a thread: the forwarder's loop as admin.start() sees it."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fwloop",
                                       daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Any, *args: Any) -> None:
        """fn(*args) on the loop, returning once it ran."""
        async def go() -> None:
            fn(*args)
        self.run(go())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.loop.close()


@dataclass
class Served:
    port: int
    controls: Controls
    fw: Loop
    host: str = HOST


def admin_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "admin" and t.is_alive()]


@contextlib.contextmanager
def serving(limits: admin.Limits = admin.LIMITS, controls: Controls | None = None,
            bind: str = HOST, dashboard_url: str | None = None) -> Iterator[Served]:
    controls = controls or Controls()
    fw = Loop()
    fam = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    if fam == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((bind, 0))  # bound, not listening: as the service hands it over
    try:
        stop = fw.run(admin.start(sock, controls, limits, dashboard_url=dashboard_url))
        try:
            yield Served(sock.getsockname()[1], controls, fw)
        finally:
            fw.run(stop())
    finally:
        fw.close()
        sock.close()


def request(srv: Served, method: str, path: str, *, host: str | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(host or srv.host, srv.port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def read_to_eof(s: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the peer sends until it closes (a reset ends it too); bounded."""
    s.settimeout(timeout)
    out = b""
    try:
        while data := s.recv(65536):
            out += data
    except ConnectionResetError:
        pass
    return out


def exchange(srv: Served, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection((srv.host, srv.port), timeout=timeout) as s:
        s.sendall(data)
        return read_to_eof(s, timeout)


def status_of(resp: bytes) -> int:
    assert resp.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), resp[:80]
    return int(resp.split(b" ", 2)[1])


def closed_by_peer(s: socket.socket, timeout: float) -> float:
    """Seconds until the peer closed `s` (EOF or reset), reading and discarding its data."""
    t0 = time.monotonic()
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


# --------------------------------------------------------------------------------------


def test_endpoints_answer_and_controls_run_on_the_forwarders_loop() -> None:
    with serving() as srv:
        c = srv.controls
        assert request(srv, "GET", "/healthz")[::2] == (200, b"ok\n")
        assert request(srv, "GET", "/readyz")[::2] == (200, b"ready\n")
        c.why = ["smtp: gate closed (probe)", "submission: gate closed (drain)"]
        assert request(srv, "GET", "/readyz")[::2] == (
            503, b"smtp: gate closed (probe)\nsubmission: gate closed (drain)\n")
        code, headers, body = request(srv, "GET", "/status")
        assert code == 200 and headers["Content-Type"] == "application/json"
        expected = {"listeners": [{"name": "smtp"}, {"name": "submission"}]}
        assert body == (json.dumps(expected, indent=2) + "\n").encode()
        code, headers, body = request(srv, "GET", "/metrics")
        assert code == 200 and headers["Content-Type"] == CONTENT_TYPE_LATEST
        assert b"forwarder_build_info{" in body and b"process_open_fds" in body

        code, _, body = request(srv, "POST", "/drain")
        assert code == 200 and json.loads(body) == {"drain": ["smtp", "submission"]}
        code, _, body = request(srv, "POST", "/resume?listener=smtp")
        assert code == 200 and json.loads(body) == {"resume": ["smtp"]}
        code, _, body = request(srv, "POST", "/drain?listener=nope")
        assert code == 404 and b"nope" in body
        assert ("drain", None) in c.calls and ("resume", "smtp") in c.calls
        assert ("drain", "nope") in c.calls
        # every call ran on the forwarder's loop, none on the admin thread or ours
        assert c.threads == {srv.fw.thread.ident}


def test_head_sends_the_headers_and_no_body() -> None:
    with serving() as srv:
        for path in ("/metrics", "/healthz", "/readyz", "/status", "/", "/events"):
            get = exchange(srv, f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            head = exchange(srv, f"HEAD {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            get_body = get.split(b"\r\n\r\n", 1)[1]
            head_head, head_body = head.split(b"\r\n\r\n", 1)
            assert status_of(head) == status_of(get) == 200, head
            assert get_body and head_body == b"", (path, head_body[:80])
            assert b"\r\nContent-Type: " in head_head
        # and HEAD on a path with no GET is a 405, as GET there is
        assert status_of(exchange(srv, b"HEAD /drain HTTP/1.1\r\nHost: t\r\n\r\n")) == 405


def test_an_unknown_path_is_404_whatever_the_method_and_405_is_for_known_paths() -> None:
    with serving() as srv:
        for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            assert request(srv, method, "/nope")[0] == 404, method
            assert request(srv, method, "/drain/more")[0] == 404, method
        for method, path in (("GET", "/drain"), ("GET", "/resume"), ("PUT", "/drain"),
                             ("POST", "/metrics"), ("POST", "/healthz"),
                             ("DELETE", "/status"), ("POST", "/readyz"), ("POST", "/"),
                             ("POST", "/events")):
            code, headers, _ = request(srv, method, path)
            assert code == 405, (method, path)
            assert headers["Allow"] in ("GET,HEAD", "POST"), headers
        assert not srv.controls.calls


def test_a_head_ending_in_bare_newlines_is_answered_at_once() -> None:
    """aiohttp's parser refuses a bare LF (RFC 9112 lets a server refuse it) and says so
    at once: the answer comes in well under the read timeout, on a connection the client
    keeps open (as `nc` does), not when the timeout ends it."""
    assert admin.LIMITS.read_timeout >= 5
    with serving() as srv:
        for head in (b"GET /healthz HTTP/1.1\n\n", b"GET /metrics HTTP/1.0\nHost: t\n\n",
                     b"GET /healthz HTTP/1.1\nHost: t\r\n\r\n"):
            with socket.create_connection((HOST, srv.port), timeout=5) as s:
                t0 = time.monotonic()
                s.sendall(head)
                resp = read_to_eof(s)
                took = time.monotonic() - t0
            assert status_of(resp) == 400, resp
            assert b"Expected CRLF" in resp, resp  # and why
            assert took < 1.0, f"answered after {took:.2f}s"


def test_a_client_that_half_closes_is_still_answered() -> None:
    """`nc -N` sends its request and shuts its write side: it still gets the answer
    (aiohttp alone closes on that EOF).  A half-close with no request in it ends at once."""
    with serving() as srv:
        for req, want in ((b"GET /healthz HTTP/1.0\r\n\r\n", b"ok\n"),
                          (b"GET /status HTTP/1.1\r\nHost: t\r\n\r\n", b"}\n"),
                          (b"\0" * 10 + b"\r\n\r\n", None)):
            with socket.create_connection((HOST, srv.port), timeout=5) as s:
                s.sendall(req)
                s.shutdown(socket.SHUT_WR)
                resp = read_to_eof(s)
            if want is None:
                assert status_of(resp) == 400
            else:
                assert status_of(resp) == 200 and resp.endswith(want), resp
        with socket.create_connection((HOST, srv.port), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
            s.shutdown(socket.SHUT_WR)
            assert closed_by_peer(s, 5) < 1  # not at the 5 s read timeout


def test_a_head_over_the_limits_is_413() -> None:
    with serving() as srv:
        def code(line: bytes, headers: bytes = b"") -> int:
            return status_of(exchange(srv, line + b"\r\nHost: t\r\n" + headers + b"\r\n"))

        # a request line of 8190 bytes of URL is fine, one more is not
        assert code(b"GET /" + b"a" * 8189 + b" HTTP/1.1") == 404
        assert code(b"GET /" + b"a" * 8190 + b" HTTP/1.1") == 413
        assert code(b"GET /" + b"a" * 100_000 + b" HTTP/1.1") == 413
        # one header line over 8190 bytes
        assert code(b"GET /healthz HTTP/1.1", b"X: " + b"y" * 8200 + b"\r\n") == 413
        # 32 headers are fine (Host and 31 more), 33 are not
        many = b"".join(b"X-%d: y\r\n" % i for i in range(32))
        assert code(b"GET /healthz HTTP/1.1", many[:-len(b"X-31: y\r\n")]) == 200
        assert code(b"GET /healthz HTTP/1.1", many) == 413
        # the whole head: 20 lines of 1000 bytes pass each line limit but not max_head
        lines = [b"X-%d: %s\r\n" % (i, b"y" * 1000) for i in range(20)]
        assert len(b"".join(lines)) > admin.LIMITS.max_head + admin.LIMITS.max_body
        assert code(b"GET /healthz HTTP/1.1", b"".join(lines)) == 413
        assert code(b"GET /healthz HTTP/1.1", b"".join(lines[:15])) == 200
        assert not srv.controls.calls


def test_a_body_we_would_not_read_is_413_at_once_and_changes_nothing() -> None:
    with serving() as srv:
        with socket.create_connection((HOST, srv.port), timeout=5) as s:
            # the head alone decides: the answer comes before a byte of the body is sent
            s.sendall(b"POST /drain HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\n\r\n")
            resp = read_to_eof(s)
        assert status_of(resp) == 413 and resp.endswith(b"request body too large\n")
        resp = exchange(srv, b"POST /drain HTTP/1.1\r\nHost: t\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n" + b"1000\r\n" + b"x" * 4096)
        assert status_of(resp) == 413
        assert not srv.controls.calls
        # a small body is ignored, as before aiohttp
        resp = exchange(srv, b"POST /drain?listener=smtp HTTP/1.1\r\nHost: t\r\n"
                             b"Content-Length: 5\r\n\r\nhello")
        assert status_of(resp) == 200 and srv.controls.calls == [("drain", "smtp")]


def test_idle_and_trickling_clients_are_cut_at_the_read_timeout() -> None:
    limits = admin.Limits(read_timeout=0.5)
    with serving(limits) as srv:
        with socket.create_connection((HOST, srv.port)) as idle:
            took = closed_by_peer(idle, 5)
        assert 0.4 < took < 3, took
        # a byte every 50 ms never completes the head, and does not push the timeout back
        with socket.create_connection((HOST, srv.port)) as slow:
            slow.settimeout(0.05)
            t0 = time.monotonic()
            head = b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + b"X-Pad: " + b"y" * 1000
            for i in range(len(head)):
                try:
                    slow.send(head[i:i + 1])
                    if not slow.recv(1):  # the 50 ms wait for data paces the trickle
                        break
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
            took = time.monotonic() - t0
        assert 0.4 < took < 3, took
        # the server still answers a prompt client
        assert request(srv, "GET", "/healthz")[0] == 200


def _tcp_state(local_port: int, remote_port: int) -> int | None:
    """The kernel's state (1 = ESTABLISHED) of the loopback TCP socket local->remote."""
    with open("/proc/net/tcp") as f:
        lines = f.read().splitlines()[1:]
    for line in lines:
        col = line.split()
        ends = (int(col[1].split(":")[1], 16), int(col[2].split(":")[1], 16))
        if ends == (local_port, remote_port):
            return int(col[3], 16)
    return None


def test_a_client_that_does_not_read_is_dropped_at_the_write_timeout() -> None:
    limits = admin.Limits(write_timeout=0.5)
    controls = Controls()
    controls.extra = {"blob": "x" * 20_000_000}  # a 20 MB /status
    with serving(limits, controls) as srv:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with s:
            s.connect((HOST, srv.port))
            s.sendall(b"GET /status HTTP/1.1\r\nHost: t\r\n\r\n")
            mine = s.getsockname()[1]
            assert _tcp_state(srv.port, mine) == 1
            # the server's end leaves ESTABLISHED (closed by the server) without our reading
            wait_until(lambda: _tcp_state(srv.port, mine) != 1, 10,
                       "the server to drop a client that does not read")
            got = len(read_to_eof(s, 10))
        assert 0 < got < 20_000_000, got  # it was cut, not sent
        assert request(srv, "GET", "/healthz")[0] == 200


def test_connections_past_the_cap_are_closed_at_once() -> None:
    limits = admin.Limits(connections=8, read_timeout=60)
    with serving(limits) as srv:
        held = [socket.create_connection((HOST, srv.port)) for _ in range(8)]
        try:
            # accepted in order: the ninth is past the cap and closed straight away
            with socket.create_connection((HOST, srv.port)) as extra:
                took = closed_by_peer(extra, 5)
            assert took < 1, took
            # those held are still served
            held[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_to_eof(held[0]).endswith(b"\r\n\r\nok\n")
            # once it is gone (one request a connection), there is room for one more

            def served() -> bool:
                try:
                    return request(srv, "GET", "/healthz")[0] == 200
                except (ConnectionError, http.client.HTTPException, OSError):
                    return False

            wait_until(served, 5, "a connection to be served after one of 8 ended")
        finally:
            for s in held:
                s.close()


def test_a_busy_forwarder_loop_gets_503_and_the_call_never_runs_later() -> None:
    limits = admin.Limits(control_timeout=0.3)
    with serving(limits) as srv:
        release = threading.Event()
        blocked = threading.Event()

        def stuck() -> None:  # the forwarder's loop stuck in a long call
            blocked.set()
            release.wait(20)

        srv.fw.loop.call_soon_threadsafe(stuck)
        assert blocked.wait(5)
        try:
            for method, path in (("GET", "/status"), ("GET", "/readyz"), ("POST", "/drain")):
                t0 = time.monotonic()
                code, _, body = request(srv, method, path)
                assert (code, body) == (503, b"forwarder busy\n"), (path, code, body)
                assert time.monotonic() - t0 < 2
            # what does not need the forwarder's loop still answers
            assert request(srv, "GET", "/metrics")[0] == 200
            assert request(srv, "GET", "/healthz")[0] == 200
        finally:
            release.set()
        srv.fw.call(lambda: None)  # the loop has run everything queued before this
        assert srv.controls.calls == []  # the drain the client was told failed did not happen
        assert request(srv, "GET", "/status")[0] == 200


def test_a_failing_control_is_500_and_the_server_goes_on() -> None:
    with serving() as srv:
        srv.controls.fail = True
        code, _, body = request(srv, "GET", "/status")
        assert (code, body) == (500, b"internal error\n")
        srv.controls.fail = False
        assert request(srv, "GET", "/status")[0] == 200


def test_scrapes_on_the_admin_thread_while_the_loop_adds_children() -> None:
    """The hot-path families are plain dicts the forwarder's loop grows (a new backend, a
    new listener); the admin thread iterates them at scrape time.  Every scrape succeeds
    while children are being added (a dict changing size under an iteration would raise)."""
    fam = metrics.HotFamily("test_admin_growing_total", "Grows while scraped", "counter",
                            ["n"])
    hist = metrics.HotHistogram("test_admin_growing_seconds", "Grows while scraped", ["n"],
                                buckets=(0.1, 1.0))
    collector = metrics._HotCollector([fam, hist])
    metrics.REGISTRY.register(collector)
    try:
        with serving() as srv:
            stop = threading.Event()

            async def grow() -> int:
                n = 0
                while not stop.is_set():
                    for _ in range(10):
                        fam.labels(str(n)).inc()
                        hist.labels(str(n)).observe(0.5)
                        n += 1
                        if n > 1000:  # new children keep coming; the oldest make room
                            del fam.children[str(n - 1000),], hist.children[str(n - 1000),]
                    await asyncio.sleep(0)
                return n

            growing = asyncio.run_coroutine_threadsafe(grow(), srv.fw.loop)
            try:
                codes = [request(srv, "GET", "/metrics")[0] for _ in range(20)]
            finally:
                stop.set()
            added = growing.result(10)
        assert codes == [200] * 20, codes
        assert added > 2000
    finally:
        metrics.REGISTRY.unregister(collector)


class _SlowCollector(Collector):
    """A collector that takes `seconds` of CPU on the thread that scrapes (allocating nothing
    the cyclic GC tracks, so the GIL hand-over is what is measured)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def collect(self) -> Iterator[Metric]:
        end = time.monotonic() + self.seconds
        n = 0
        while time.monotonic() < end:
            n += sum(range(100))
        fam = GaugeMetricFamily("test_admin_slow_scrape", "A scrape that takes a while")
        fam.add_metric([], float(n > 0))
        yield fam


_CONNECTOR = r"""
import json, socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
out = []
until = time.monotonic() + seconds
while time.monotonic() < until:
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        assert c.recv(1) == b"a"  # sent by the accepting side: the round trip is the accept
    out.append((t0, time.monotonic() - t0))
    if len(out) == 1:
        print("ready", flush=True)
print(json.dumps(out))
"""


def test_a_slow_scrape_does_not_delay_the_forwarders_accepts() -> None:
    """A listener on the forwarder's loop keeps accepting within milliseconds while /metrics
    takes 0.6 s of CPU on the admin thread; on the forwarder's loop each of those accepts
    would wait for the scrape.  The connecting client is another process (its own GIL)."""
    slow = _SlowCollector(0.6)
    metrics.REGISTRY.register(slow)
    lsock = socket.socket()
    try:
        with serving() as srv:
            lsock.bind((HOST, 0))
            lsock.listen(128)
            lsock.setblocking(False)

            def accept() -> None:
                while True:
                    try:
                        c, _ = lsock.accept()
                    except BlockingIOError:
                        return
                    c.send(b"a")
                    c.close()

            srv.fw.call(srv.fw.loop.add_reader, lsock.fileno(), accept)
            client = subprocess.Popen(
                [sys.executable, "-c", _CONNECTOR, str(lsock.getsockname()[1]), "3"],
                stdout=subprocess.PIPE, text=True)
            try:
                assert client.stdout is not None
                assert select.select([client.stdout], [], [], 10)[0], "the client did not start"
                assert client.stdout.readline() == "ready\n"
                with socket.create_connection((HOST, srv.port), timeout=10) as s:
                    t0 = time.monotonic()
                    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
                    s.settimeout(10)
                    first = s.recv(65536)
                    t1 = time.monotonic()  # the scrape is built before its first byte
                    body = first + read_to_eof(s)
                out, _ = client.communicate(timeout=20)
            finally:
                if client.poll() is None:
                    client.kill()
                    client.wait(5)
            srv.fw.call(srv.fw.loop.remove_reader, lsock.fileno())
        during = [lat for at, lat in json.loads(out) if t0 <= at <= t1]
        assert b"test_admin_slow_scrape 1.0" in body
        assert t1 - t0 >= 0.6
        assert len(during) >= 10, during
        assert max(during) < 0.1, f"accept took up to {max(during) * 1000:.0f} ms"
    finally:
        metrics.REGISTRY.unregister(slow)
        lsock.close()


def test_ipv4_mapped_loopback_may_drain() -> None:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback")
    with serving(bind="::") as srv:
        # 127.0.0.1 to a dual-stack socket: the peer is ::ffff:127.0.0.1
        code, _, body = request(srv, "POST", "/drain?listener=smtp", host="127.0.0.1")
        assert code == 200 and json.loads(body) == {"drain": ["smtp"]}
        code, _, _ = request(srv, "POST", "/resume?listener=smtp", host="::1")
        assert code == 200
        assert srv.controls.calls == [("drain", "smtp"), ("resume", "smtp")]


def _local_non_loopback() -> str | None:
    """This host's address towards the outside (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        try:
            u.connect(("192.0.2.1", 9))
        except OSError:
            return None
        addr = str(u.getsockname()[0])
    return None if addr.startswith("127.") else addr


def test_a_non_loopback_peer_may_scrape_but_not_drain() -> None:
    addr = _local_non_loopback()
    if addr is None:
        pytest.skip("no non-loopback address (test_admin.py covers it with a namespace)")
    with serving(bind="0.0.0.0") as srv:
        assert request(srv, "GET", "/metrics", host=addr)[0] == 200
        for path in ("/drain", "/resume", "/drain?listener=smtp"):
            code, _, body = request(srv, "POST", path, host=addr)
            assert code == 403 and b"loopback" in body
        assert srv.controls.calls == []
        assert request(srv, "POST", "/drain", host=HOST)[0] == 200


def test_stop_closes_the_listener_and_connections_and_ends_the_thread() -> None:
    before = len(admin_threads())
    fw = Loop()
    socks = [socket.socket(), socket.socket()]
    try:
        for sock in socks:  # a reload starts it again on a new socket, on the same loop
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
            stop = fw.run(admin.start(sock, Controls()))
            assert len(admin_threads()) == before + 1
            idle = socket.create_connection((HOST, port))
            with socket.create_connection((HOST, port)) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
                assert read_to_eof(s).endswith(b"ok\n")
            t0 = time.monotonic()
            fw.run(stop())
            assert time.monotonic() - t0 < admin.STOP_TIMEOUT
            assert len(admin_threads()) == before
            assert sock.fileno() == -1  # the stopper closed the listening socket
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((HOST, port), timeout=2).close()
            with idle:  # a connection open at stop time is ended, not left behind
                assert closed_by_peer(idle, 5) < 5
    finally:
        fw.close()
        for sock in socks:
            sock.close()


# --- /events, the status page, the browser's buttons ---------------------------------------


def _event(seq: int, kind: str, at: float, **fields: Any) -> dict[str, Any]:
    return {"seq": seq, "time": at, "kind": kind, **fields}


def test_events_are_the_controls_history_newer_than_since() -> None:
    with serving() as srv:
        t = time.time()
        srv.controls.history = [_event(1, "backend.down", t, backend="b:25", reason="refused"),
                                _event(2, "gate.closed", t, listener="smtp", reason="probe"),
                                _event(3, "gate.open", t, listener="smtp", reason="probe")]
        code, headers, body = request(srv, "GET", "/events")
        assert code == 200 and headers["Content-Type"] == "application/json"
        assert json.loads(body) == srv.controls.history
        assert [e["seq"] for e in json.loads(request(srv, "GET", "/events?since=1")[2])] == [2, 3]
        assert json.loads(request(srv, "GET", "/events?since=3")[2]) == []
        for bad in ("x", "-1", "1.5", ""):
            code, _, body = request(srv, "GET", f"/events?since={bad}")
            assert code == 400 and b"since" in body, bad
        assert [c for c in srv.controls.calls if c[0] == "events"] == [
            ("events", "0"), ("events", "1"), ("events", "3")]
        assert srv.controls.threads == {srv.fw.thread.ident}  # on the forwarder's loop


def _listener(detail: str = "220 mx ESMTP", name: str = "smtp") -> dict[str, Any]:
    """A listener as Service.status() reports it (the shape of a live /status)."""
    now = time.time()
    probe = {"ok": False, "result": "failure", "detail": detail, "duration": 0.0012, "at": now}
    up = {"ok": True, "result": "success", "detail": "220, QUIT 221", "duration": 0.0031,
          "at": now, "greeting": 0.002}

    def backend(bname: str, hist: list[dict[str, Any]], is_up: bool) -> dict[str, Any]:
        return {"name": bname, "up": is_up, "draining": False, "local": is_up, "priority": 0,
                "source": "static", "probe": {"kind": "smtp", "interval": 2.0},
                "greeting_deadline": {"seconds": 1.0, "mode": "auto", "samples": 3},
                "history": hist, "checks": [{"name": "smtp", "kind": "smtp", "history": hist}]}

    return {"name": name, "addresses": ["127.0.0.1:25"], "mode": "smtp",
            "gate": {"state": "open", "reason": "probe", "drained": False, "holds": [],
                     "open_error": None, "policy": "any"},
            "greeting_timeout": "auto", "greeting_timeout_max": 10.0,
            "connections_active": 7, "connections_pending": 0,
            "backends": [backend("127.0.0.1:2525", [up] * 5, True),
                         backend("mx2.example:25", [probe] * 3, False)]}


def _script_hash(page: str) -> str:
    import base64
    import hashlib
    import re

    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert len(scripts) == 1, scripts
    return base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()


def test_the_page_escapes_what_backends_say_and_runs_only_its_own_script() -> None:
    """A backend's greeting is the network's: markup in it (or in an event's reason) is
    shown as text.  The page fetches nothing, and its CSP allows its one script by hash
    (a hash that did not match would silently stop the refresh)."""
    evil = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
    c = Controls()
    c.extra = {"version": "1.2.3", "pid": 42, "listeners": [_listener(evil, name="smtp")]}
    c.history = [_event(1, "backend.down", time.time(), backend="mx2.example:25", reason=evil),
                 _event(2, "gate.open", time.time(), listener="smtp", reason="probe")]
    with serving(controls=c) as srv:
        code, headers, body = request(srv, "GET", "/")
    page = body.decode()
    assert code == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert evil not in page and "<img" not in page and "onerror=alert(2)>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&gt;&lt;img" in page
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and f"script-src 'sha256-{_script_hash(page)}'" in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    # self-contained: no src= at all, no link off the admin port
    assert " src=" not in page.replace("&quot;&gt;&lt;img src=x", "")
    assert "http://" not in page and "https://" not in page and "//" not in page.replace(
        "http://www.w3.org/2000/svg", "")
    # what it shows: the gate and since when (from the history), each backend's state,
    # its checks' last result with latency, and the last probes as marks
    assert 'data-listener="smtp" data-gate="open"' in page
    assert 'data-backend="127.0.0.1:2525" data-state="up"' in page
    assert 'data-backend="mx2.example:25" data-state="down"' in page
    assert page.count('<rect class="ok"') == 5 and page.count('<rect class="fail"') == 3
    assert "3.1 ms" in page and "1.2 ms" in page and "live connections <b>7</b>" in page
    assert 'action="drain?listener=smtp"' in page and 'method="post"' in page
    assert "1.2.3" in page and "Grafana" not in page
    assert len(body) < 30_000


def test_the_page_links_the_dashboard_when_configured() -> None:
    url = "https://grafana.example/d/forwarder?var-instance=mx1&x=<y>"
    with serving(dashboard_url=url) as srv:
        page = request(srv, "GET", "/")[2].decode()
    assert ('<a href="https://grafana.example/d/forwarder?var-instance=mx1&amp;x=&lt;y&gt;"'
            in page)
    with serving(dashboard_url="javascript:alert(1)") as srv:
        page = request(srv, "GET", "/")[2].decode()
    assert "javascript:" not in page and "Grafana" not in page


def test_the_page_refresh_can_be_stopped_and_a_bad_value_is_400() -> None:
    with serving() as srv:
        assert 'data-refresh="5"' in request(srv, "GET", "/")[2].decode()
        assert 'data-refresh="0"' in request(srv, "GET", "/?refresh=0")[2].decode()
        assert 'data-refresh="2"' in request(srv, "GET", "/?refresh=1")[2].decode()
        assert request(srv, "GET", "/?refresh=soon")[0] == 400


def test_the_gate_says_since_when_and_why_from_the_history() -> None:
    t0 = time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1))
    closed = _listener()
    closed["gate"].update(state="closed", reason="open_failed", drained=True,
                          open_error={"errno": "EADDRINUSE", "error": "Address in use",
                                      "address": "0.0.0.0:25", "holder": "pid 99 (exim4)",
                                      "failures": 3, "retry_in": 0.8})
    c = Controls()
    c.extra = {"listeners": [closed]}
    c.history = [_event(1, "gate.open", t0 - 60, listener="smtp", reason="probe"),
                 _event(2, "gate.open_failed", t0, listener="smtp", reason="Address in use"),
                 _event(3, "drain", t0 + 1, listeners=["smtp"], reason="operator")]
    with serving(controls=c) as srv:
        page = request(srv, "GET", "/")[2].decode()
    assert "CLOSED</span> since 2026-01-02 03:04:05" in page
    assert "reason <b>open_failed</b> (Address in use)" in page
    assert "drained by the operator at 2026-01-02 03:04:06" in page
    assert "listen() on 0.0.0.0:25 failed: Address in use (held by pid 99 (exim4)); 3" in page
    assert 'action="resume?listener=smtp"' in page  # drained: the button gives it back

    # the history has moved on (full of other news): since before its oldest event
    from forwarder.ops import history

    c.history = [_event(i, "probe.failed", t0 + i, backend="b:25", reason="refused")
                 for i in range(1, history.SIZE + 1)]
    with serving(controls=c) as srv:
        page = request(srv, "GET", "/")[2].decode()
    assert "CLOSED</span> since before 2026-01-02 03:04:06" in page
    c.history = c.history[-10:]
    with serving(controls=c) as srv:
        assert "CLOSED</span> since unknown" in request(srv, "GET", "/")[2].decode()


def test_the_last_minute_comes_from_snapshots_of_the_counters() -> None:
    from forwarder.ops.page import Outcomes

    now = [1000.0]
    counts: dict[tuple[str, ...], float] = {("smtp", "spliced"): 10.0}
    o = Outcomes(read=lambda: dict(counts), clock=lambda: now[0])
    assert o.table() == (counts, {("smtp", "spliced"): 0.0}, 0.0)
    for _ in range(30):  # 150 s of samples, 5 s apart, 2 connections each
        now[0] += 5
        counts[("smtp", "spliced")] += 2
        o.sample()
    totals, last, span = o.table()
    assert totals == {("smtp", "spliced"): 70.0}
    assert last == {("smtp", "spliced"): 24.0} and span == 60.0
    assert len(o.ring) <= 14  # a minute of snapshots, not the whole run
    for _ in range(100):  # renders in a burst do not each add one
        o.table()
    assert len(o.ring) <= 14


def _post(srv: Served, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    return request(srv, "POST", path, headers={"Content-Length": "0", **headers})


def test_a_browsers_form_post_is_redirected_to_the_page_and_the_api_keeps_its_json() -> None:
    with serving() as srv:
        origin = f"http://{HOST}:{srv.port}"
        form = {"Content-Type": "application/x-www-form-urlencoded", "Origin": origin,
                "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "navigate",
                "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
        code, headers, body = _post(srv, "/drain?listener=smtp", form)
        assert code == 303 and headers["Location"] == "./"
        assert json.loads(body) == {"drain": ["smtp"]}
        # Accept alone decides too; a form content type alone (curl -d '') does not
        assert _post(srv, "/resume?listener=smtp", {"Accept": "text/html"})[0] == 303
        code, _, body = _post(srv, "/resume", {"Content-Type": form["Content-Type"],
                                               "Accept": "*/*"})
        assert code == 200 and json.loads(body) == {"resume": ["smtp", "submission"]}
        for accept in ("application/json", "*/*", "text/html;q=0.5, application/json",
                       "text/html, application/json", "text/html;q=0"):
            assert _post(srv, "/drain?listener=smtp", {"Accept": accept})[0] == 200, accept
        # the page's form for a listener that does not exist: the 404 says so
        code, _, body = _post(srv, "/drain?listener=nope", form)
        assert code == 404 and b"nope" in body


def test_a_post_a_browser_makes_for_another_site_is_403_and_changes_nothing() -> None:
    with serving() as srv:
        me = f"{HOST}:{srv.port}"
        refused = [
            {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},
            {"Sec-Fetch-Site": "same-site", "Origin": f"http://{HOST}:1"},  # another port
            {"Origin": "null"},  # a file, a sandboxed frame
            {"Origin": f"http://{HOST}:1"},
            # DNS rebinding: the browser thinks it is the same origin; the name tells
            {"Host": f"rebind.example:{srv.port}", "Origin": f"http://rebind.example:{srv.port}",
             "Sec-Fetch-Site": "same-origin"},
        ]
        for h in refused:
            code, _, body = _post(srv, "/drain?listener=smtp", h)
            assert code == 403 and b"another site" in body, h
        assert srv.controls.calls == []
        allowed = [{"Origin": f"http://{me}", "Sec-Fetch-Site": "same-origin"},
                   {"Sec-Fetch-Site": "none"},  # typed or bookmarked
                   {"Host": f"localhost:{srv.port}", "Origin": f"http://localhost:{srv.port}"},
                   {}]  # curl, scripts
        for h in allowed:
            assert _post(srv, "/drain?listener=smtp", h)[0] == 200, h
        assert len(srv.controls.calls) == len(allowed)
