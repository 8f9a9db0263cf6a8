"""Socket-level rules shared by the gate, the hand-off, the relay and the probes.

Keeping the port while not listening.  A closed gate is a socket that is bound but not in
LISTEN.  With SO_REUSEADDR on, Linux lets a second socket bind the same address while
neither listens (a second forwarder started by mistake, xinetd, a restarting MTA), and
that socket's listen() then takes the port from under us: our next listen() fails with
EADDRINUSE.  So SO_REUSEADDR is on only while we listen (needed: our own connections in
TIME_WAIT would otherwise make listen() fail) and off while we do not, which makes every
other bind on the address fail.  The kernel caches "everyone here reuses" per port
(tb->fastreuse) and drops that cache only when a socket on the port listens, so a socket
that had to be bound with SO_REUSEADDR on (TIME_WAIT leftovers of a previous instance)
listens once with backlog 0 and stops again at once: `unlisten(claim=True)`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct

LINGER_RST = struct.pack("ii", 1, 0)


def reset(sock: socket.socket) -> None:
    """Close with a RST, not a FIN: a cut-off transfer must not look complete to the
    peer, and a probe's socket must not sit in TIME_WAIT."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    except OSError:
        pass
    sock.close()


def relisten(sock: socket.socket, backlog: int) -> None:
    """Back to LISTEN (may raise OSError: EADDRINUSE when another socket took the port)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.listen(backlog)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        raise


def unlisten(sock: socket.socket, *, claim: bool = False) -> None:
    """Out of LISTEN, keeping the port (see the module docstring); `claim` first listens
    so that the kernel forgets it let others share the port."""
    if claim:
        sock.listen(0)
    sock.shutdown(socket.SHUT_RD)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)


def fmt_addr(addr: tuple[object, ...] | None) -> str:
    """host:port for logs, IPv6 bracketed ([::1]:25)."""
    if not addr:
        return "?"
    host = str(addr[0])
    return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"


def local_addresses() -> frozenset[str]:
    """This host's own unicast addresses, from /proc (no privilege needed, no libc DNS)."""
    out: set[str] = set()
    with contextlib.suppress(OSError), open("/proc/net/if_inet6", encoding="ascii") as f:
        for line in f:
            h = line.split(maxsplit=1)[0] if line.strip() else ""
            if len(h) == 32:
                out.add(str(ipaddress.IPv6Address(bytes.fromhex(h))))
    with contextlib.suppress(OSError), open("/proc/net/fib_trie", encoding="ascii") as f:
        last = ""
        for line in f:
            s = line.strip()
            if s.startswith(("|--", "+--")):
                last = s[3:].split()[0]
            elif s == "/32 host LOCAL" and last:
                out.add(last)
    return frozenset(out)
