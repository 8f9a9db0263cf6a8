"""Health probes: one function per kind, each returns a ProbeResult and never raises.

The `smtp` probe exists because a hung JVM still completes the TCP handshake: only a
greeting within the timeout proves the backend would serve a sender.

`run_check(check, target, send_proxy)` is the entry point for every kind (tcp, smtp with
EHLO/MAIL/RCPT, http, exec, agent), driven by a `CheckConfig`; each kind lives in its own
module under `checks/`.  `probe(kind, ep, timeout, send_proxy)` below is the older tcp/smtp
probe, kept unchanged while the prober moves over to `run_check`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time

from ..config.model import Endpoint, ProbeKind
from ..net import proxy_protocol
from .checks import run_check
from .result import ProbeResult

__all__ = ["ProbeResult", "probe", "run_check"]


def _done(ok: bool, result: str, detail: str, t0: float) -> ProbeResult:
    return ProbeResult(ok, result, detail, time.monotonic() - t0, time.time())


async def probe(kind: ProbeKind, ep: Endpoint, timeout: float,
                send_proxy: str | None = None) -> ProbeResult:
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            if kind == "tcp":
                return await _tcp(ep, t0)
            return await _smtp(ep, t0, send_proxy)
    except TimeoutError:
        return _done(False, "timeout", f"no answer within {timeout:g}s", t0)
    except OSError as e:
        return _done(False, "failure", e.strerror or str(e), t0)
    except Exception as e:  # a probe must never take the prober down
        return _done(False, "failure", f"{type(e).__name__}: {e}", t0)


async def _tcp(ep: Endpoint, t0: float) -> ProbeResult:
    _, writer = await asyncio.open_connection(ep.host, ep.port)
    _close(writer)
    return _done(True, "success", "connected", t0)


async def _smtp(ep: Endpoint, t0: float, send_proxy: str | None) -> ProbeResult:
    reader, writer = await asyncio.open_connection(ep.host, ep.port)
    try:
        if send_proxy:
            sock = writer.get_extra_info("socket")
            # the probe's own addresses, as HAProxy's check-send-proxy does
            src = writer.get_extra_info("sockname")
            dst = writer.get_extra_info("peername")
            hdr = (proxy_protocol.header(send_proxy, src[:2], dst[:2]) if src and dst
                   else proxy_protocol.header_for_socket(send_proxy, sock))
            writer.write(hdr)
        code, text = await _reply(reader)
        if code != 220:
            return _done(False, "failure", f"greeting {code} {text}".strip(), t0)
        writer.write(b"QUIT\r\n")
        code, text = await _reply(reader)
        if code != 221:
            return _done(False, "failure", f"QUIT answered {code} {text}".strip(), t0)
        return _done(True, "success", "220/221", t0)
    finally:
        _close(writer)


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    """Read one (possibly multi-line) SMTP reply; (0, why) when the peer closed."""
    while True:
        line = await reader.readline()
        if not line:
            return 0, "connection closed before a reply"
        if len(line) < 4 or not line[:3].isdigit():
            return 0, f"not an SMTP reply: {line[:40]!r}"
        if line[3:4] != b"-":
            return int(line[:3]), line[4:].decode("latin-1").strip()


def _close(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # RST instead of FIN + TIME_WAIT: probes every few seconds must not fill the
        # port range with TIME_WAIT entries.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
