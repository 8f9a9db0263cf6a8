"""DNS discovery against a real DNS server (tests/dnsserver.py) and the real forwarder.

Peers live on distinct loopback addresses (127.0.0.11, .12 ...) with one backend port, as
discovery maps every MX host to `port`.  The static local backend is down and the gate is
"any", so the gate opens only through peers learnt from DNS.
"""

from __future__ import annotations

import json
import re
import smtplib
import socket
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from forwarder.health.discovery import parse_nameserver

from .dnsserver import DnsServer
from .helpers import (
    EchoBackend,
    Forwarder,
    SmtpBackend,
    forwarder,
    free_port,
    toml_listener,
    wait_port,
    wait_until,
)

DOMAIN = "example.test"
PEERS = {"mx1": "127.0.0.11", "mx2": "127.0.0.12", "mx3": "127.0.0.13"}


# --------------------------------------------------------------------------------------
# the DNS server and the config that points at it


@pytest.fixture
def dns_server() -> Iterator[tuple[DnsServer, str]]:
    """(server, the `nameservers` entry that reaches it: "IP:PORT", any free port)."""
    with DnsServer("127.0.0.1") as s:
        yield s, f"127.0.0.1:{s.port}"


def peer_port(*hosts: str) -> int:
    """A port free on every one of `hosts` (peers share the discovery port)."""
    for _ in range(50):
        port = free_port(hosts[0])
        try:
            for h in hosts[1:]:
                with socket.socket() as s:
                    s.bind((h, port))
        except OSError:
            continue
        return port
    raise AssertionError(f"no common free port on {hosts}")


def fw_config(port: int, admin: int, ns: str, discovery: str, *, peers_port: int = 8025,
              mode: str = "tcp", extra: str = "") -> str:
    down = free_port()  # the static local backend: nothing listens there
    return toml_listener(
        port, down, mode=mode, probe=mode, top=f'admin = "127.0.0.1:{admin}"',
        extra=f'gate = "any"\n{extra}',
        probe_extra=f"""
[listener.discovery]
{discovery}
port = {peers_port}
nameservers = ["{ns}"]
ttl_min = 0.5
ttl_max = 30
timeout = 0.5
""")


def mx_zone(server: DnsServer, mx: dict[str, int], ttl: int = 1) -> None:
    """MX records for DOMAIN: {"mx1": 5, ...}, each host with its A record."""
    server.set(DOMAIN, "MX", [(pref, f"{h}.{DOMAIN}.") for h, pref in mx.items()], ttl=ttl)
    for h in mx:
        if h in PEERS:
            server.set(f"{h}.{DOMAIN}", "A", [PEERS[h]], ttl=ttl)


# --------------------------------------------------------------------------------------
# looking at the forwarder from outside


def http_get(admin: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}{path}", timeout=5) as r:
        return bytes(r.read())


def dns_backends(admin: int) -> dict[str, dict[str, Any]]:
    st = json.loads(http_get(admin, "/status"))
    return {b["name"]: b for b in st["listeners"][0]["backends"] if b["source"] == "dns"}


def lookups(admin: int, result: str) -> float:
    body = http_get(admin, "/metrics").decode()
    pat = r'^forwarder_dns_lookups_total\{listener="smtp",result="' + result + r'"\} (\S+)$'
    m = re.search(pat, body, re.M)
    return float(m.group(1)) if m else 0.0


def dns_peers_gauge(admin: int) -> float:
    body = http_get(admin, "/metrics").decode()
    m = re.search(r'^forwarder_dns_peers\{listener="smtp"\} (\S+)$', body, re.M)
    return float(m.group(1)) if m else -1.0


def greeting(port: int) -> str:
    """Which echo backend the forwarder relays a new connection to ('' when none)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.settimeout(5)
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(100)
                if not chunk:
                    break
                data += chunk
            s.sendall(b"ping\n")
            echo = s.recv(100) if data else b""
            return data.decode().strip() if echo == b"ping\n" else ""
    except OSError:
        return ""


def peers_event(fw: Forwarder, since: int, want: set[str], timeout: float) -> dict[str, Any]:
    """The first dns.peers log event after `since` whose backends are exactly `want`."""
    found: dict[str, Any] = {}

    def seen() -> bool:
        fw.read_events()
        for ev in fw.events[since:]:
            if ev.get("event") == "dns.peers" and {p["backend"] for p in ev["peers"]} == want:
                found.update(ev)
                return True
        assert fw.proc is not None and fw.proc.poll() is None, fw.log_tail()
        return False

    wait_until(seen, timeout, f"dns.peers {sorted(want)}", interval=0.02)
    return found


def up(admin: int, want: set[str]) -> bool:
    b = dns_backends(admin)
    return set(b) == want and all(x["up"] for x in b.values())


# --------------------------------------------------------------------------------------
# tests


def test_nameserver_entries_take_a_port() -> None:
    assert (parse_nameserver("127.0.0.1").address, parse_nameserver("127.0.0.1").port) == \
        ("127.0.0.1", 53)
    ns = parse_nameserver("127.0.0.1:5353")
    assert (ns.address, ns.port) == ("127.0.0.1", 5353)
    ns = parse_nameserver("[::1]:5353")
    assert (ns.address, ns.port) == ("::1", 5353)
    assert parse_nameserver("::1").port == 53
    for bad in ("example.org", "127.0.0.1:0", "[::1]x"):
        with pytest.raises(ValueError):
            parse_nameserver(bad)


def test_mx_peers_open_the_gate_and_follow_record_changes(
        dns_server: tuple[DnsServer, str]) -> None:
    server, ns = dns_server
    mx_zone(server, {"mx1": 5, "mx2": 10})
    port, admin = free_port(), free_port()
    bport = peer_port(*PEERS.values())
    mx1, mx2, mx3 = (SmtpBackend(bport, PEERS[h]) for h in ("mx1", "mx2", "mx3"))
    with mx1, mx2, mx3, forwarder(fw_config(port, admin, ns, f'mx = "{DOMAIN}"',
                                            peers_port=bport, mode="smtp")) as fw:
        a1, a2, a3 = (f"{PEERS[h]}:{bport}" for h in ("mx1", "mx2", "mx3"))
        ev = peers_event(fw, 0, {a1, a2}, 10)
        assert [(p["host"], p["priority"]) for p in ev["peers"]] == \
            [(f"mx1.{DOMAIN}", 105), (f"mx2.{DOMAIN}", 110)]
        wait_port("127.0.0.1", port, "open", 10)  # the local backend is down: DNS did this
        wait_until(lambda: up(admin, {a1, a2}), 10, "both peers up")  # not just the first
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
            c.sendmail("a@example.org", ["b@example.test"], b"Subject: 1\r\n\r\nvia mx1\r\n")
        assert mx1.wait_messages(1)[0]["data"].endswith(b"via mx1\r\n")
        assert not mx2.messages
        assert dns_peers_gauge(admin) == 2

        # mx1 leaves, mx3 arrives with a better preference: followed within a few seconds
        mark = fw.mark()
        t0 = time.monotonic()
        mx_zone(server, {"mx3": 1, "mx2": 10})
        server.delete(f"mx1.{DOMAIN}")
        peers_event(fw, mark, {a3, a2}, 10)
        t_dns = time.monotonic() - t0
        wait_until(lambda: up(admin, {a3, a2}), 10, "mx3 up, mx1 gone")
        t_up = time.monotonic() - t0
        print(f"\nMX change followed: peers in {t_dns:.2f}s, mx3 up in {t_up:.2f}s "
              "(record ttl 1 s)")
        assert t_dns < 5
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
            c.sendmail("a@example.org", ["b@example.test"], b"Subject: 2\r\n\r\nvia mx3\r\n")
        assert mx3.wait_messages(1)[0]["data"].endswith(b"via mx3\r\n")
        assert len(mx1.messages) == 1 and not mx2.messages
        assert dns_backends(admin)[a3]["priority"] == 101
        fw.wait_event("backend.removed", since=mark, backend=a1, source="dns")

        # mx3 dies: the relay falls back to mx2 (health still decides among DNS peers)
        mx3.stop()
        wait_until(lambda: not dns_backends(admin)[a3]["up"], 10, "mx3 down")
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
            c.sendmail("a@example.org", ["b@example.test"], b"Subject: 3\r\n\r\nvia mx2\r\n")
        assert mx2.wait_messages(1)[0]["data"].endswith(b"via mx2\r\n")


def test_srv_maps_target_and_port(dns_server: tuple[DnsServer, str]) -> None:
    server, ns = dns_server
    p1, p2 = free_port(PEERS["mx1"]), free_port(PEERS["mx2"])
    srv = f"_smtp._tcp.{DOMAIN}"
    server.set(srv, "SRV", [(20, 1, p2, f"b.{DOMAIN}."), (10, 5, p1, f"a.{DOMAIN}.")], ttl=1)
    server.set(f"a.{DOMAIN}", "A", [PEERS["mx1"]])
    server.set(f"b.{DOMAIN}", "A", [PEERS["mx2"]])
    port, admin = free_port(), free_port()
    with EchoBackend(p1, PEERS["mx1"], greeting=b"a\n"), \
            EchoBackend(p2, PEERS["mx2"], greeting=b"b\n") as b, \
            forwarder(fw_config(port, admin, ns, f'srv = "{srv}"')) as fw:
        a1, a2 = f"{PEERS['mx1']}:{p1}", f"{PEERS['mx2']}:{p2}"
        ev = peers_event(fw, 0, {a1, a2}, 10)
        assert [(p["backend"], p["priority"]) for p in ev["peers"]] == [(a1, 110), (a2, 120)]
        wait_port("127.0.0.1", port, "open", 10)
        wait_until(lambda: up(admin, {a1, a2}), 10, "both targets up")
        assert greeting(port) == "a"
        # the better target moves to another port: the old endpoint goes, the new one is used
        b.stop()
        p3 = free_port(PEERS["mx2"])
        with EchoBackend(p3, PEERS["mx2"], greeting=b"b3\n"):
            mark = fw.mark()
            server.set(srv, "SRV", [(5, 0, p3, f"b.{DOMAIN}."), (10, 5, p1, f"a.{DOMAIN}.")],
                       ttl=1)
            a3 = f"{PEERS['mx2']}:{p3}"
            peers_event(fw, mark, {a3, a1}, 10)
            wait_until(lambda: up(admin, {a3, a1}), 10, "new SRV target up")
            assert greeting(port) == "b3"
            assert dns_backends(admin)[a3]["priority"] == 105


FAULTS = [
    # (server mode or "noanswer": the records vanish, expected result label)
    ("servfail", "servfail"),
    ("timeout", "timeout"),
    ("garbage", None),  # dnspython drops unparseable UDP replies: a timeout, or a failure
    ("tcp_garbage", "failed"),  # truncated over UDP, then garbage over TCP
    ("nxdomain", "nxdomain"),
    ("noanswer", "noanswer"),
]
FAILED = ("timeout", "servfail", "nxdomain", "noanswer", "failed")


def test_dns_faults_keep_the_last_good_peers(dns_server: tuple[DnsServer, str]) -> None:
    server, ns = dns_server
    mx_zone(server, {"mx1": 5})
    server.set(DOMAIN, "A", ["192.0.2.1"])  # the name exists: no MX is NODATA, not NXDOMAIN
    port, admin = free_port(), free_port()
    bport = peer_port(PEERS["mx1"])
    a1 = f"{PEERS['mx1']}:{bport}"
    with EchoBackend(bport, PEERS["mx1"], greeting=b"mx1\n"), \
            forwarder(fw_config(port, admin, ns, f'mx = "{DOMAIN}"', peers_port=bport)) as fw:
        peers_event(fw, 0, {a1}, 10)
        wait_port("127.0.0.1", port, "open", 10)
        assert greeting(port) == "mx1"
        for mode, label in FAULTS:
            mark = fw.mark()
            before = {r: lookups(admin, r) for r in FAILED}
            ok0 = lookups(admin, "ok")
            if mode == "noanswer":
                server.set(DOMAIN, "MX", [])
            else:
                server.mode = mode
            try:
                def failed_twice(before: dict[str, float] = before,
                                 label: str | None = label) -> bool:
                    now = {r: lookups(admin, r) for r in FAILED}
                    if label is not None:
                        return now[label] >= before[label] + 2
                    return sum(now.values()) >= sum(before.values()) + 2

                wait_until(failed_twice, 15, f"two {mode} lookups counted", interval=0.05)
                ev = fw.wait_event("dns.failed", since=mark, name=DOMAIN)
                assert ev["kept"] == [a1], ev
                # the last good peer is kept and still relays; nothing else changed
                assert set(dns_backends(admin)) == {a1}
                assert greeting(port) == "mx1"
                assert dns_peers_gauge(admin) == 1
                assert not [e for e in fw.events[mark:] if e.get("event") == "dns.peers"]
                assert fw.proc is not None and fw.proc.poll() is None
            finally:
                server.mode = "ok"
                mx_zone(server, {"mx1": 5})

            def recovered(ok0: float = ok0) -> bool:
                return lookups(admin, "ok") > ok0

            wait_until(recovered, 10, f"recovery from {mode}")
        assert set(dns_backends(admin)) == {a1}

        # one target's address lookup fails while the MX answer is fine: that target keeps
        # its last good addresses ("partial"), the others are still followed
        a2 = f"{PEERS['mx2']}:{bport}"
        mark = fw.mark()
        mx_zone(server, {"mx1": 5, "mx2": 10})
        peers_event(fw, mark, {a1, a2}, 10)
        mark = fw.mark()
        partial0 = lookups(admin, "partial")
        server.name_modes[f"mx1.{DOMAIN}"] = "servfail"
        try:
            wait_until(lambda: lookups(admin, "partial") >= partial0 + 2, 15,
                       "two partial lookups")
            assert set(dns_backends(admin)) == {a1, a2}
            assert greeting(port) == "mx1"
            server.set(DOMAIN, "MX", [(10, f"mx2.{DOMAIN}.")], ttl=1)  # mx1 leaves for real
            peers_event(fw, mark, {a2}, 10)
        finally:
            server.name_modes.clear()


def test_this_host_is_not_its_own_peer(dns_server: tuple[DnsServer, str]) -> None:
    server, ns = dns_server
    bport = peer_port(PEERS["mx2"], "127.0.0.21", "127.0.0.22")
    server.set(DOMAIN, "MX", [(1, f"me.{DOMAIN}."), (2, f"self.{DOMAIN}."),
                              (3, f"loop.{DOMAIN}."), (4, f"fwd.{DOMAIN}."),
                              (10, f"mx2.{DOMAIN}.")], ttl=1)
    server.set(f"me.{DOMAIN}", "A", ["127.0.0.21"])  # excluded by address
    server.set(f"self.{DOMAIN}", "A", ["127.0.0.22"])  # excluded by name
    server.set(f"loop.{DOMAIN}", "A", ["127.0.0.1"])  # the listener's own address
    server.set(f"fwd.{DOMAIN}", "A", ["127.0.0.23"])  # the listener's hostname
    server.set(f"mx2.{DOMAIN}", "A", [PEERS["mx2"]])
    port, admin = free_port(), free_port()
    disc = f'mx = "{DOMAIN}"\nexclude = ["127.0.0.21", "self.{DOMAIN}"]'
    with EchoBackend(bport, PEERS["mx2"], greeting=b"mx2\n"), \
            EchoBackend(bport, "127.0.0.21", greeting=b"me\n"), \
            EchoBackend(bport, "127.0.0.22", greeting=b"self\n"), \
            forwarder(fw_config(port, admin, ns, disc, peers_port=bport,
                                extra=f'hostname = "fwd.{DOMAIN}"')) as fw:
        a2 = f"{PEERS['mx2']}:{bport}"
        ev = peers_event(fw, 0, {a2}, 10)
        assert [p["host"] for p in ev["peers"]] == [f"mx2.{DOMAIN}"]
        wait_port("127.0.0.1", port, "open", 10)
        assert greeting(port) == "mx2"
        assert set(dns_backends(admin)) == {a2}
        assert dns_peers_gauge(admin) == 1


def test_reload_adds_and_removes_discovery(dns_server: tuple[DnsServer, str]) -> None:
    """SIGHUP with a [listener.discovery] table starts discovery without a restart; one
    without it removes the DNS peers again (the gate closes: only a dead local is left)."""
    import signal

    server, ns = dns_server
    mx_zone(server, {"mx1": 5})
    port, admin = free_port(), free_port()
    bport = peer_port(PEERS["mx1"])
    with_dns = fw_config(port, admin, ns, f'mx = "{DOMAIN}"', peers_port=bport)
    without = with_dns[:with_dns.index("[listener.discovery]")]
    with EchoBackend(bport, PEERS["mx1"]), forwarder(without) as fw:
        fw.wait_event("probe.failed")
        assert not dns_backends(admin)
        fw.config_path.write_text(with_dns)
        mark = fw.mark()
        fw.signal(signal.SIGHUP)
        peers_event(fw, mark, {f"{PEERS['mx1']}:{bport}"}, 10)
        wait_port("127.0.0.1", port, "open", 10)
        fw.config_path.write_text(without)
        mark = fw.mark()
        fw.signal(signal.SIGHUP)
        fw.wait_event("reload.done", since=mark)
        wait_until(lambda: not dns_backends(admin), 10, "DNS peers removed")
        wait_port("127.0.0.1", port, "refused", 10)
