"""Admin HTTP listener: /metrics, /healthz, /readyz, /status, POST /drain and /resume.

A deliberately small HTTP/1.1 server on the forwarder's own event loop (no thread, no
framework): one request per connection, bounded request size and read time, so a scanner
or a stuck client cannot hurt the relay.  Drain and resume change the gate, so they are
refused (403) from any non-loopback peer, even when the listener is bound to a public
address so that a remote Prometheus can scrape /metrics.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..config.model import Endpoint
from . import metrics

if TYPE_CHECKING:
    from ..service import Service

log = structlog.get_logger("forwarder.admin")

MAX_REQUEST = 8192
READ_TIMEOUT = 5.0
REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 413: "Payload Too Large",
           503: "Service Unavailable"}


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class Admin:
    def __init__(self, endpoint: Endpoint, service: Service) -> None:
        self.endpoint = endpoint
        self.service = service

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, ctype, body = self.route(head, peer[0] if peer else "")
        except asyncio.LimitOverrunError:
            status, ctype, body = 413, "text/plain", b"request too large\n"
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        except TimeoutError:
            status, ctype, body = 408, "text/plain", b"request timeout\n"
        except Exception as e:  # never let the admin port take the forwarder down
            log.exception("admin.error", error=str(e))
            status, ctype, body = 400, "text/plain", b"bad request\n"
        head_out = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
                    f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n").encode()
        try:
            writer.write(head_out + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def route(self, head: bytes, peer: str) -> tuple[int, str, bytes]:
        try:
            line = head.split(b"\r\n", 1)[0].decode("ascii")
            method, target, _version = line.split(" ", 2)
        except (UnicodeDecodeError, ValueError):
            return 400, "text/plain", b"bad request line\n"
        url = urlsplit(target)
        query = parse_qs(url.query)
        name = query.get("listener", [None])[0]
        path = url.path
        if path in ("/drain", "/resume"):
            if method != "POST":
                return 405, "text/plain", b"use POST\n"
            if not _is_loopback(peer):
                log.warning("admin.forbidden", path=path, peer=peer)
                return 403, "text/plain", b"drain/resume only from loopback\n"
            done = (self.service.drain(name) if path == "/drain"
                    else self.service.resume(name))
            if not done:
                return 404, "text/plain", f"no listener {name!r}\n".encode()
            log.info("admin." + path[1:], listeners=done, peer=peer)
            return 200, "application/json", _json({path[1:]: done})
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"use GET\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(metrics.REGISTRY)
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            why = self.service.readiness()
            if why:
                return 503, "text/plain", "".join(f"{w}\n" for w in why).encode()
            return 200, "text/plain", b"ready\n"
        if path == "/status":
            return 200, "application/json", _json(self.service.status())
        return 404, "text/plain", b"not found\n"


def _json(data: Any) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


async def start(sock: socket.socket, service: Service) -> Callable[[], Awaitable[None]]:
    """Serve on `sock` (bound before the privilege drop); return an async stopper."""
    host, port = sock.getsockname()[:2]
    endpoint = Endpoint(host, port)
    admin = Admin(endpoint, service)
    server = await asyncio.start_server(admin.handle, sock=sock, limit=MAX_REQUEST)
    log.info("admin.listening", address=str(endpoint))

    async def close() -> None:
        server.close()
        await server.wait_closed()

    return close
