"""The parts every check shares: how a check says "down", how it quotes a backend, how it
connects and reads a line.

A check reports down by raising `CheckFailed(detail)`; the detail is read by an operator
in a log line or in /status, so it names the step and what the backend did, never a Python
exception.  Anything a backend sends is untrusted: `quote()` escapes it (no raw control
characters reach a terminal or a log) and cuts it short.  Lines are read with a cap
(`LINE_CAP`, RFC 5321's 512 octets for a reply line), because a backend that streams
bytes without a newline must cost a bounded amount of memory and end as a clear failure.

`connect()` sets SO_LINGER to zero before connecting, so that however the socket is closed
afterwards (by us, by a transport, or on cancellation) it closes with a RST: probes run
every few seconds and must not fill the port range with TIME_WAIT entries.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from dataclasses import dataclass

from ...net.sockets import LINGER_RST, fmt_addr

LINE_CAP = 512  # bytes per line read from a backend, the line ending included


class CheckFailed(Exception):
    """The backend is down; `detail` says why, in words an operator can act on."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True)
class Verdict:
    """What a check that ran to its end concluded."""

    ok: bool
    detail: str
    drain: bool = False


class Progress:
    """Where a running check is, so that a timeout can say what it was waiting for, and
    what it learnt before the deadline (the smtp greeting latency) is not lost."""

    def __init__(self) -> None:
        self.step = "the check to start"
        self.greeting: float | None = None


def quote(data: bytes | str, limit: int = 120) -> str:
    """`data` as a quoted, escaped, length-capped string for a detail: 'abc\\r\\x00...'."""
    if isinstance(data, bytes):
        cut = data[:limit]
        text = repr(cut)[1:]  # b'...' -> '...': every control byte escaped
        more = len(data) - len(cut)
    else:
        cut_s = data[:limit]
        text = "'" + "".join(c if c.isprintable() else _escape(c) for c in cut_s) + "'"
        more = len(data) - len(cut_s)
    return f"{text}... ({more} more)" if more else text


def _escape(c: str) -> str:
    return repr(c)[1:-1] if ord(c) < 0x10000 else f"\\U{ord(c):08x}"


def os_words(e: OSError) -> str:
    """An OSError as words: "connection refused", not "[Errno 111] Connect call failed"."""
    if isinstance(e, socket.gaierror):
        return f"name not resolved ({e.strerror})" if e.strerror else "name not resolved"
    if e.errno == errno.ECONNREFUSED:
        return "connection refused (nothing listening)"
    if e.strerror:
        return e.strerror[:1].lower() + e.strerror[1:]
    return str(e) or type(e).__name__


async def connect(host: str, port: int, progress: Progress) -> tuple[socket.socket, float]:
    """A connected non-blocking socket that will close with a RST, and the monotonic time
    its (successful) connect started.  Every address of `host` is tried in turn."""
    loop = asyncio.get_running_loop()
    where = fmt_addr((host, port))
    progress.step = f"the connect to {where}"
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise CheckFailed(f"cannot resolve {host}: {os_words(e)}") from None
    last: OSError | None = None
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            started = time.monotonic()
            await loop.sock_connect(sock, addr)
            return sock, started
        except OSError as e:
            sock.close()
            last = e
        except BaseException:  # cancelled by the deadline: do not leak the socket
            sock.close()
            raise
    why = os_words(last) if last else "no address"
    raise CheckFailed(f"connect to {where}: {why}")


async def streams(sock: socket.socket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams over a connected socket, with reads capped at LINE_CAP per line."""
    try:
        return await asyncio.open_connection(sock=sock, limit=LINE_CAP)
    except BaseException:
        sock.close()
        raise


async def read_line(reader: asyncio.StreamReader, what: str) -> bytes:
    """One line, LF included; CheckFailed naming `what` when it is too long or cut short."""
    try:
        return await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise CheckFailed(f"{what}: line longer than {LINE_CAP} bytes") from None
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise CheckFailed(
                f"{what}: connection closed in the middle of a line: {quote(e.partial)}"
            ) from None
        raise CheckFailed(f"{what}: connection closed before a reply") from None
