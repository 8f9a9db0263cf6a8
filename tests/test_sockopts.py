"""`nodelay` and `keepalive` reach both sockets of a relayed connection.

Read off the forwarder's own sockets: each of its socket fds is duplicated into the test with
pidfd_getfd(2) and asked with getsockopt(), so the test sees what the kernel holds, not what
the config says.  (The client side inherits both options from the listening socket.)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .helpers import SmtpBackend, forwarder, free_port, toml_listener

_SYS_PIDFD_GETFD = 438  # x86_64 and aarch64 (asm-generic) alike
_libc = ctypes.CDLL(None, use_errno=True)


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (the forwarder's worker processes, when it has any)."""
    out = [pid]
    for p in out:
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        out += [int(k) for k in kids]
    return out


@contextmanager
def foreign_sockets(root: int) -> Iterator[list[socket.socket]]:
    """Duplicates of every TCP socket `root` and its descendants hold."""
    with contextlib.ExitStack() as stack:
        socks: list[socket.socket] = []
        for pid in tree(root):
            socks += stack.enter_context(_sockets_of(pid))
        yield socks


@contextmanager
def _sockets_of(pid: int) -> Iterator[list[socket.socket]]:
    pidfd = os.pidfd_open(pid)
    socks: list[socket.socket] = []
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                err = ctypes.get_errno()
                if err in (1, 38):  # EPERM (no ptrace right), ENOSYS (kernel < 5.6)
                    pytest.skip(f"pidfd_getfd: {os.strerror(err)}")
                continue  # closed meanwhile
            s = socket.socket(fileno=fd)
            if s.type == socket.SOCK_STREAM and s.family in (socket.AF_INET, socket.AF_INET6):
                socks.append(s)
            else:
                s.close()
        yield socks
    finally:
        for s in socks:
            s.close()
        os.close(pidfd)


def _opts(s: socket.socket) -> tuple[int, int]:
    return (s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
            int(s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0))


@pytest.mark.parametrize(("relay", "on"), [("splice", True), ("splice", False)])
def test_nodelay_and_keepalive_on_both_sides(relay: str, on: bool) -> None:
    port = free_port()
    flag = "true" if on else "false"
    with SmtpBackend() as be:
        extra = f'relay = "{relay}"\nnodelay = {flag}\nkeepalive = {flag}\n'
        cfg = toml_listener(port, be.port, interval=60, extra=extra)
        with forwarder(cfg) as fw:
            fw.wait_event("gate.open")  # no knocking: every connection here is the test's
            with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                c.settimeout(10)
                assert c.recv(100).startswith(b"220 ")  # spliced: both sockets exist
                mine = c.getsockname()
                with foreign_sockets(fw.pid) as socks:
                    client_side = [s for s in socks if _peer(s) == mine]
                    # (probes every 60 s: the first is long over, the next far off)
                    backend_side = [s for s in socks if _peer(s) == ("127.0.0.1", be.port)]
                    assert len(client_side) == 1, [_peer(s) for s in socks]
                    assert len(backend_side) == 1, [_peer(s) for s in socks]
                    want = (1, 1) if on else (0, 0)
                    assert _opts(client_side[0]) == want
                    assert _opts(backend_side[0]) == want


def _peer(s: socket.socket) -> tuple[str, int] | None:
    try:
        host, port = s.getpeername()[:2]
    except OSError:
        return None
    return host, port

