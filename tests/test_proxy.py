"""PROXY protocol towards the backend, checked by a real consumer: aiosmtpd's PROXY support
(the server end of a relayed session, and its header parser for the property test)."""

from __future__ import annotations

import asyncio
import ipaddress
import smtplib
from typing import Any

import pytest
from aiosmtpd.proxy_protocol import get_proxy
from hypothesis import given, settings
from hypothesis import strategies as st

from forwarder.net.proxy_protocol import header

from .helpers import SmtpBackend, forwarder, free_port, toml_listener, wait_port


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("client", ["127.0.0.5", "::1"])
def test_backend_sees_the_original_client_address(version: str, client: str) -> None:
    port = free_port()
    listen = "::1" if ":" in client else "127.0.0.1"
    with SmtpBackend(proxy_protocol=True) as be:
        cfg = toml_listener(port, be.port, address=listen, extra=f'send_proxy = "{version}"')
        with forwarder(cfg) as fw:  # the smtp probe sends a header too, or it never passes
            wait_port(listen, port, "open", 10)
            with smtplib.SMTP(timeout=10, source_address=(client, 0)) as c:
                c.connect(listen, port)
                assert c.sock is not None
                sport = c.sock.getsockname()[1]
                c.sendmail("a@example.org", ["b@example.net"], "Subject: p\r\n\r\nproxied\r\n")
            msg = be.wait_messages(1)[0]
            assert fw.proc is not None and fw.proc.poll() is None
    pd = msg["proxy"]
    assert pd is not None and pd.valid, pd
    assert str(pd.src_addr) == client and pd.src_port == sport
    assert str(pd.dst_addr) == listen and pd.dst_port == port
    assert pd.version == int(version[1])
    # the backend's own peer is the forwarder, not the client
    assert msg["peer"][0] != client or client == listen


class _Reader:
    """The reader interface aiosmtpd's parser wants, over a fixed byte string."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read(self, n: int = -1) -> bytes:
        n = len(self.data) if n < 0 else n
        out, self.data = self.data[:n], self.data[n:]
        return out

    async def readexactly(self, n: int) -> bytes:
        if len(self.data) < n:
            raise asyncio.IncompleteReadError(self.data, n)
        return await self.read(n)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        i = self.data.find(separator)
        if i < 0:
            raise asyncio.IncompleteReadError(self.data, None)
        return await self.read(i + len(separator))


def _norm(a: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IPv4-mapped IPv6 address travels as IPv4 (that is what the client really is)."""
    ip = ipaddress.ip_address(a)
    return (ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else ip


ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6)
ports = st.integers(0, 65535)


@settings(max_examples=300, deadline=None)
@given(version=st.sampled_from(["v1", "v2"]),
       pair=st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6), st.tuples(ipv4, ipv6)),
       sport=ports, dport=ports)
def test_headers_parse_back_in_aiosmtpd(version: str, pair: Any, sport: int,
                                        dport: int) -> None:
    src, dst = (str(a) for a in pair)
    raw = header(version, (src, sport), (dst, dport))
    pd = asyncio.run(get_proxy(_Reader(raw + b"EHLO x\r\n")))
    assert pd.valid, (raw, pd.error)
    s_ip, d_ip = _norm(src), _norm(dst)
    if s_ip.version != d_ip.version:  # mixed families: UNKNOWN / LOCAL, addresses withheld
        assert pd.src_addr is None
        return
    assert ipaddress.ip_address(str(pd.src_addr)) == s_ip
    assert ipaddress.ip_address(str(pd.dst_addr)) == d_ip
    assert (pd.src_port, pd.dst_port) == (sport, dport)
