"""PROXY protocol v1/v2 headers (haproxy's proxy-protocol.txt), writer side only.

The backend learns the real client address from this header; a backend that expects it
also greets only after it arrives, so probes send one too.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY = 0x21  # version 2, command PROXY
_V2_LOCAL = 0x20
_AF_INET_STREAM = 0x11
_AF_INET6_STREAM = 0x21

Address = tuple[str, int]


def _ip(addr: Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(addr[0].split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


def header_v1(src: Address | None, dst: Address | None) -> bytes:
    """`PROXY TCP4 src dst sport dport\\r\\n`; UNKNOWN when the family is unknown or mixed."""
    if src is None or dst is None:
        return b"PROXY UNKNOWN\r\n"
    s, d = _ip(src), _ip(dst)
    if s.version != d.version:
        return b"PROXY UNKNOWN\r\n"
    fam = "TCP4" if s.version == 4 else "TCP6"
    return f"PROXY {fam} {s} {d} {src[1]} {dst[1]}\r\n".encode("ascii")


def header_v2(src: Address | None, dst: Address | None) -> bytes:
    if src is None or dst is None:
        return V2_SIGNATURE + struct.pack("!BBH", _V2_LOCAL, 0, 0)
    s, d = _ip(src), _ip(dst)
    if s.version != d.version:
        return V2_SIGNATURE + struct.pack("!BBH", _V2_LOCAL, 0, 0)
    fam = _AF_INET_STREAM if s.version == 4 else _AF_INET6_STREAM
    body = s.packed + d.packed + struct.pack("!HH", src[1], dst[1])
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, fam, len(body)) + body


def header(version: str, src: Address | None, dst: Address | None) -> bytes:
    return header_v1(src, dst) if version == "v1" else header_v2(src, dst)


def header_for_socket(version: str, sock: socket.socket) -> bytes:
    """The header describing `sock`'s peer (source) and local address (destination)."""
    try:
        src = sock.getpeername()[:2]
        dst = sock.getsockname()[:2]
    except OSError:
        return header(version, None, None)
    return header(version, src, dst)
