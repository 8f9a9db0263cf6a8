"""Faults: misbehaving backends and clients end cleanly, with bounded memory, no fd leak,
no busy loop, and no flapping."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from .helpers import (
    IS_ROOT,
    EchoBackend,
    Forwarder,
    SmtpBackend,
    _ThreadServer,
    connect_result,
    forwarder,
    free_port,
    smtp_reply,
    toml_listener,
    wait_port,
    wait_until,
)

LINGER_RST = struct.pack("ii", 1, 0)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle_fds(fw: Forwarder, baseline: int) -> None:
    wait_until(lambda: fd_count(fw.pid) <= baseline, 10,
               f"fd count back to {baseline} (now {fd_count(fw.pid)})")


class NeverReads(_ThreadServer):
    """Accepts and never reads: the client's writes must block, not pile up in us."""

    def handle(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self._stop.wait(30)


class HalfCloser(_ThreadServer):
    """Sends its reply and shuts its write side at once, but keeps reading to EOF."""

    def __init__(self) -> None:
        super().__init__()
        self.received = 0

    def handle(self, conn: socket.socket) -> None:
        conn.sendall(b"bye now\r\n")
        conn.shutdown(socket.SHUT_WR)
        while data := conn.recv(65536):
            self.received += len(data)


def _tcp(port: int, bport: int, extra: str = "") -> str:
    return toml_listener(port, bport, mode="tcp", probe="tcp", extra=extra)


def test_backend_that_never_reads_keeps_our_memory_bounded() -> None:
    port = free_port()
    with NeverReads() as be, forwarder(_tcp(port, be.port)) as fw:
        wait_port("127.0.0.1", port, "open", 10)
        before = rss_kib(fw.pid)
        sent = 0
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.settimeout(2)
            chunk = b"x" * 65536
            deadline = time.monotonic() + 20
            with contextlib.suppress(TimeoutError):
                while time.monotonic() < deadline and sent < 512 * 1024 * 1024:
                    sent += s.send(chunk)
            grown = rss_kib(fw.pid) - before
        # the kernel buffers some, we hold at most our high-water mark: far from 512 MiB
        assert sent < 64 * 1024 * 1024, f"{sent} bytes accepted from the client"
        assert grown < 16 * 1024, f"forwarder RSS grew {grown} KiB"


def test_backend_half_close_delivers_both_ways() -> None:
    port = free_port()
    with HalfCloser() as be, forwarder(_tcp(port, be.port)) as fw:
        wait_port("127.0.0.1", port, "open", 10)
        baseline = fd_count(fw.pid)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            got = b""
            while chunk := s.recv(100):  # the backend's FIN reaches us as EOF...
                got += chunk
            assert got == b"bye now\r\n"
            s.sendall(b"y" * 1_000_000)  # ...yet we can still send the other way
            s.shutdown(socket.SHUT_WR)
            assert s.recv(10) == b""
        wait_until(lambda: be.received >= 1_000_000, 10, "all bytes at the backend")
        assert be.received == 1_000_000
        settle_fds(fw, baseline)


def test_faults_leave_no_fd_or_task_behind() -> None:
    """Resets from either side, instant closes, a killed backend: back to baseline."""
    port = free_port()
    with EchoBackend() as be, forwarder(_tcp(port, be.port)) as fw:
        wait_port("127.0.0.1", port, "open", 10)
        baseline = fd_count(fw.pid)
        for i in range(60):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            if i % 3 == 0:
                s.sendall(b"abc")
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            elif i % 3 == 1:
                s.sendall(b"abc")
                assert s.recv(3) == b"abc"
            s.close()
        be.stop()  # kill the backend with connections open
        settle_fds(fw, baseline)


def test_alternating_probe_results_do_not_flap_the_gate() -> None:
    """A backend whose probes alternate good/bad never makes rise=2/fall=2 flip."""
    port = free_port()

    class Alternating(_ThreadServer):
        def handle(self, conn: socket.socket) -> None:
            if self.accepted % 2:
                conn.sendall(b"220 ok\r\n")
                conn.recv(100)
                conn.sendall(b"221 bye\r\n")
            else:
                conn.sendall(b"554 not now\r\n")
            conn.close()

    with Alternating() as be, \
            forwarder(toml_listener(port, be.port, interval=0.05, rise=2, fall=2)) as fw:
        wait_until(lambda: be.accepted >= 40, 20, "40 probes")
        fw.read_events()
        assert not [e for e in fw.events if e["event"] in ("gate.open", "gate.closed")]
        assert connect_result("127.0.0.1", port) == "refused"


def test_slow_probe_answers_within_timeout_keep_the_gate_steady() -> None:
    port = free_port()

    class Slow(_ThreadServer):
        def handle(self, conn: socket.socket) -> None:
            time.sleep(0.35)  # near the 0.5 s probe timeout
            conn.sendall(b"220 slow\r\n")
            conn.recv(100)
            conn.sendall(b"221 bye\r\n")

    cfg = toml_listener(port, 0, interval=0.05, rise=1, fall=1, probe_timeout=0.5)
    with Slow() as be:
        cfg = cfg.replace("127.0.0.1:0", f"127.0.0.1:{be.port}")
        with forwarder(cfg) as fw:
            fw.wait_event("gate.open", timeout=10)
            wait_until(lambda: be.accepted >= 12, 20, "12 slow probes")
            fw.read_events()
            assert not [e for e in fw.events if e["event"] == "gate.closed"]


def test_idle_clients_do_not_starve_others_and_per_source_caps_one_address() -> None:
    port = free_port()
    extra = "idle_timeout = 30\n[listener.access]\nper_source = 20\n"
    with SmtpBackend() as be, forwarder(toml_listener(port, be.port, extra=extra)):
        wait_port("127.0.0.1", port, "open", 10)
        idle = []
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            assert smtp_reply(s).startswith(b"220")
            idle.append(s)
        # a 21st from the same address is turned away with a reason to retry later
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            assert smtp_reply(s).startswith(b"421 4.7.0 ")
        # another address is still served at once
        with socket.create_connection(("127.0.0.1", port), timeout=5,
                                      source_address=("127.0.0.2", 0)) as s:
            assert smtp_reply(s).startswith(b"220")
        for s in idle:
            s.close()


def test_fd_exhaustion_pauses_accept_without_spinning() -> None:
    """With its fd limit reached the forwarder must not busy-loop on accept(); once fds
    free up, new connections flow again."""
    port = free_port()
    limit = 64
    with EchoBackend() as be, forwarder(
            _tcp(port, be.port),
            prefix=["prlimit", f"--nofile={limit}:{limit}"]) as fw:
        wait_port("127.0.0.1", port, "open", 10)
        held = []
        with contextlib.suppress(OSError):
            for _ in range(limit):  # each splice costs 2 fds: this exhausts them
                s = socket.create_connection(("127.0.0.1", port), timeout=2)
                held.append(s)
        fw.wait_event("gate.accept_paused", timeout=10)
        c0 = cpu_seconds(fw.pid)
        time.sleep(2.0)  # measuring idle CPU over a fixed window: the sleep is the point
        burnt = cpu_seconds(fw.pid) - c0
        assert burnt < 0.5, f"{burnt:.2f}s CPU in 2 s while out of fds: busy loop"
        for s in held:
            s.close()
        # after the pause, service resumes
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    s.sendall(b"ping")
                    s.settimeout(2)
                    if s.recv(4) == b"ping":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "no service after fds were freed"


def test_out_of_fds_for_pipes_a_splice_copies_instead_and_delivers_every_byte() -> None:
    """Sessions accepted while fds last, then a bulk transfer that wants a pipe pair it
    cannot get: the relay falls back to copying, both ways intact."""
    port = free_port()
    limit = 64
    with EchoBackend() as be, forwarder(
            _tcp(port, be.port),
            prefix=["prlimit", f"--nofile={limit}:{limit}"]) as fw:
        wait_port("127.0.0.1", port, "open", 10)
        held: list[socket.socket] = []
        while fd_count(fw.pid) < limit - 1:  # leave fewer than a pipe pair needs
            s = socket.socket()
            if not held:  # the bulk session: a small receive buffer forces partial sends
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.settimeout(2)
            s.connect(("127.0.0.1", port))
            s.sendall(b"hi")
            s.settimeout(5)
            try:
                ok = s.recv(2) == b"hi"  # spliced: its two fds are taken
            except OSError:
                ok = False
            if not ok:  # the last one found no fd for its backend socket
                s.close()
                break
            held.append(s)
        assert limit - fd_count(fw.pid) < 2
        payload = os.urandom(4 << 20)
        bulk = held[0]
        got = bytearray()

        def reader() -> None:
            while chunk := bulk.recv(1 << 16):
                got.extend(chunk)

        t = threading.Thread(target=reader)
        t.start()
        bulk.sendall(payload)
        bulk.shutdown(socket.SHUT_WR)
        t.join(30)
        assert bytes(got) == payload
        fw.read_events()
        assert "Too many open files" not in fw.log_path.read_text()  # no failed callback
        for s in held:
            s.close()


def gate_status(admin: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=5) as r:
        return str(json.load(r)["listeners"][0]["gate"]["state"])


def last_gate_event(fw: Forwarder) -> str:
    fw.read_events()
    for ev in reversed(fw.events):
        if ev.get("event") in ("gate.open", "gate.closed"):
            return str(ev["event"])
    return ""


@pytest.mark.heavy
@pytest.mark.parametrize("user", ["nobody", "root"])
def test_gate_flaps_under_traffic_lose_nothing(user: str) -> None:
    """Backend killed and restarted in a loop while clients keep coming: every accepted
    connection is either spliced intact or answered 421; never silence, never a 5xx.

    A closing gate drops new SYNs with a socket filter while in-flight handshakes settle
    (see gate.py).  Where the kernel refuses that filter to an unprivileged process (this
    sandbox wants CAP_NET_ADMIN), the drop-to-nobody run falls back to drain-then-shutdown,
    and a handshake completing in that instant is reset by the kernel before the
    forwarder ever sees it: that run allows those resets (and only resets: a timeout would
    be a silent hang) at a bounded rate and says so.
    The root run (no privilege drop) must have none."""
    if user == "root" and not IS_ROOT:
        pytest.skip("needs root")
    flaps = int(os.environ.get("FORWARDER_FLAPS", "1000"))
    if user == "root":
        flaps = min(flaps, 300)
    port, bport = free_port(), free_port()
    admin = free_port()
    # a backend caught between kill and restart may accept and stay silent: its 421 must
    # come well inside the clients' 10 s reply timeout (the default greeting_timeout is 10 s)
    cfg = toml_listener(port, bport, interval=0.02, rise=1, fall=1, probe_timeout=0.5,
                        top=f'admin = "127.0.0.1:{admin}"\nuser = "{user}"',
                        extra="connect_timeout = 2.0\ngreeting_timeout = 3.0\n")
    stats = {"spliced": 0, "421": 0, "refused": 0, "reset_after_greeting": 0, "bad": 0}
    stop = threading.Event()
    bad: list[bytes] = []

    def client() -> None:
        while not stop.is_set():
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
            except ConnectionRefusedError:
                stats["refused"] += 1
                continue
            except OSError:
                continue
            reply = b""
            try:
                reply = smtp_reply(s, timeout=10)
                if not reply:
                    stats["bad"] += 1
                    bad.append(b"silent close before any reply")
                elif reply.startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    smtp_reply(s, timeout=10)
                    stats["spliced"] += 1
                elif reply.startswith(b"421 4.3.2"):
                    stats["421"] += 1
                else:
                    stats["bad"] += 1
                    bad.append(reply)
            except OSError as e:
                # a backend killed mid-session may reset us after its greeting: a visible
                # failure, not a silent one.  Before any reply it would be a silent drop.
                if not reply:
                    stats["bad"] += 1
                    bad.append(b"reset before any reply: " + repr(e).encode())
                else:
                    stats["reset_after_greeting"] += 1
            finally:
                s.close()

    with forwarder(cfg) as fw:
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        try:
            for _ in range(flaps):
                # the latest gate event, not the first after a mark: under load a probe
                # may fail once while the backend is up, and that close is not the one
                # that follows the kill
                with SmtpBackend(bport):
                    wait_until(lambda: last_gate_event(fw) == "gate.open", 10, "gate open")
                wait_until(lambda: last_gate_event(fw) == "gate.closed", 10, "gate closed")
                # no backend now, so the gate stays closed: /status and the port agree
                assert gate_status(admin) == "closed"
                assert connect_result("127.0.0.1", port) == "refused"
                assert time.monotonic() - t0 < 600
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        fw.read_events()
        unfiltered = any(e["event"] == "gate.syn_filter_unavailable" for e in fw.events)
        print(f"\n{flaps} flaps as {user} in {time.monotonic() - t0:.1f}s: {stats}, "
              f"bad={bad[:5]}, syn filter {'unavailable' if unfiltered else 'used'}")
        if unfiltered:  # the kernel-level race only: resets before a reply, rarely
            # (measured 1 to 5 per 1,000 flaps under ~800k connection attempts)
            assert all(b.startswith(b"reset before any reply: ConnectionResetError")
                       for b in bad), bad[:5]
            assert stats["bad"] <= max(2, flaps // 100), bad[:5]
        else:
            assert stats["bad"] == 0, bad[:5]
        assert stats["spliced"] > 0 and stats["refused"] > 0

