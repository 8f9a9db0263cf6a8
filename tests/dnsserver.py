"""A small authoritative DNS server for tests: UDP and TCP on loopback, in a thread.

The zone is a dict the test changes while the server runs:

    with DnsServer() as dns:
        dns.set("example.test", "MX", [(5, "mx1.example.test."), (10, "mx2.example.test.")],
                ttl=1)
        dns.set("mx1.example.test", "A", ["127.0.0.11"])
        dns.mode = "servfail"   # for every query; see MODES
        dns.name_modes["mx2.example.test"] = "timeout"   # for one name only

Built on dnspython's message parsing and rendering, so the answers are real DNS on the wire.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import struct
import threading
from collections import Counter
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

# ok | servfail | nxdomain | timeout: no reply | garbage: random bytes back |
# tcp_garbage: a valid truncated (TC) reply over UDP, random bytes over the TCP retry
MODES = ("ok", "servfail", "nxdomain", "timeout", "garbage", "tcp_garbage")


def _name(name: str) -> dns.name.Name:
    return dns.name.from_text(name)  # relative names are taken as absolute


def _rdata_text(rtype: str, rec: Any) -> str:
    """(5, "mx1.example.test.") for MX, (prio, weight, port, target) for SRV, else text."""
    if isinstance(rec, tuple | list):
        return " ".join(str(x) for x in rec)
    return str(rec)


class DnsServer:
    """Authoritative for whatever names `set()` gave it; NXDOMAIN for the rest."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._mode = "ok"
        self._zone: dict[tuple[dns.name.Name, dns.rdatatype.RdataType], dns.rrset.RRset] = {}
        self._lock = threading.Lock()
        self.name_modes: dict[str, str] = {}  # "name" (no trailing dot) -> mode
        self.queries: Counter[str] = Counter()  # by "name TYPE", and "*" for every query
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {value!r}")
        self._mode = value

    # --- the zone -----------------------------------------------------------------------

    def set(self, name: str, rtype: str, records: list[Any], ttl: int = 60) -> None:
        """Replace the records of one name and type (an empty list removes them)."""
        n, t = _name(name), dns.rdatatype.from_text(rtype)
        with self._lock:
            if not records:
                self._zone.pop((n, t), None)
                return
            self._zone[(n, t)] = dns.rrset.from_text_list(
                n, ttl, dns.rdataclass.IN, t, [_rdata_text(rtype, r) for r in records])

    def delete(self, name: str, rtype: str | None = None) -> None:
        n = _name(name)
        with self._lock:
            for key in [k for k in self._zone if k[0] == n and
                        (rtype is None or k[1] == dns.rdatatype.from_text(rtype))]:
                del self._zone[key]

    def count(self, name: str, rtype: str) -> int:
        with self._lock:
            return self.queries[f"{_name(name).to_text().lower()} {rtype.upper()}"]

    # --- answering ----------------------------------------------------------------------

    def answer(self, wire: bytes, tcp: bool) -> bytes | None:
        """The reply to one query, or None to stay silent."""
        try:
            q = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None  # not DNS: a real server would drop it too
        mode = self.mode
        with self._lock:
            self.queries["*"] += 1
            for qq in q.question:
                self.queries[f"{qq.name.to_text().lower()} "
                             f"{dns.rdatatype.to_text(qq.rdtype)}"] += 1
                mode = self.name_modes.get(qq.name.to_text().lower().rstrip("."), mode)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "timeout":
            return None
        if mode == "garbage" or (mode == "tcp_garbage" and tcp):
            return os.urandom(max(len(wire), 12))
        r = dns.message.make_response(q)
        r.flags |= dns.flags.AA
        if mode == "tcp_garbage":
            r.flags |= dns.flags.TC
            return r.to_wire()
        if mode == "servfail":
            r.set_rcode(dns.rcode.SERVFAIL)
        elif mode == "nxdomain":
            r.set_rcode(dns.rcode.NXDOMAIN)
        else:
            with self._lock:
                for qq in q.question:
                    rrset = self._zone.get((qq.name, qq.rdtype))
                    if rrset is not None:
                        r.answer.append(rrset)
                    elif not any(k[0] == qq.name for k in self._zone):
                        r.set_rcode(dns.rcode.NXDOMAIN)
                    # else: the name exists without this type: NOERROR, no answer (NODATA)
        if tcp:
            return r.to_wire()
        try:
            return r.to_wire(max_size=max(512, q.payload if q.edns >= 0 else 512))
        except dns.exception.TooBig:
            t = dns.message.make_response(q)
            t.flags |= dns.flags.AA | dns.flags.TC
            return t.to_wire()

    # --- serving ------------------------------------------------------------------------

    def start(self) -> DnsServer:
        fam = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        want = self.port
        for attempt in range(20):  # port 0: a UDP port whose TCP twin is free too
            udp = socket.socket(fam, socket.SOCK_DGRAM)
            tcp = socket.socket(fam, socket.SOCK_STREAM)
            try:
                udp.bind((self.host, want))
                self.port = udp.getsockname()[1]  # the TCP side takes the same number
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((self.host, self.port))
                tcp.listen(64)
                break
            except OSError:
                udp.close()
                tcp.close()
                if want != 0 or attempt == 19:
                    raise
        self._udp, self._tcp = udp, tcp
        t = threading.Thread(target=self._serve, name=f"dns {self.host}:{self.port}",
                             daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None
        sel = selectors.DefaultSelector()
        sel.register(self._udp, selectors.EVENT_READ, "udp")
        sel.register(self._tcp, selectors.EVENT_READ, "tcp")
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(0.1):
                    if key.data == "udp":
                        self._on_udp()
                    else:
                        self._on_tcp()
        finally:
            sel.close()

    def _on_udp(self) -> None:
        assert self._udp is not None
        try:
            wire, peer = self._udp.recvfrom(65535)
        except OSError:
            return
        reply = self.answer(wire, tcp=False)
        if reply is not None:
            with contextlib.suppress(OSError):
                self._udp.sendto(reply, peer)

    def _on_tcp(self) -> None:
        assert self._tcp is not None
        try:
            conn, _ = self._tcp.accept()
        except OSError:
            return
        t = threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True)
        t.start()
        self._threads.append(t)

    def _tcp_conn(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        buf = b""
        with conn:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65535)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
                    n = struct.unpack("!H", buf[:2])[0]
                    wire, buf = buf[2:2 + n], buf[2 + n:]
                    reply = self.answer(wire, tcp=True)
                    if reply is not None:
                        try:
                            conn.sendall(struct.pack("!H", len(reply)) + reply)
                        except OSError:
                            return

    def stop(self) -> None:
        self._stop.set()
        if self._threads:
            self._threads[0].join(5)  # the selector loop: no new connection threads after it
        for t in list(self._threads[1:]):
            t.join(5)
        for s in (self._udp, self._tcp):
            if s is not None:
                s.close()
        self._udp = self._tcp = None

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
