"""http: GET a health URL and judge the status code and, when it is one, a health document.

The URL may point anywhere (the backend's own port, an admin port, a sidecar): a mail
server's SMTP port cannot say "my user store is down", its admin API can.  Up is a 2xx, or
one of `expect_status` when that is set.  A JSON body in the style of Apache James's
webadmin `/healthcheck` (`{"status": "healthy" | "degraded" | "unhealthy", "checks":
[{"componentName": ..., "status": ..., "cause": ...}]}`; James answers 200 for healthy and
degraded, 503 for unhealthy) refines that: "unhealthy" is down whatever the status code,
"degraded" is up, or up with `drain` under `degraded = "drain"` (no new connections, live
ones finish), and the detail names every component that is not healthy, with its cause.

Bounds: up to MAX_REDIRECTS (3) redirects are followed, to any http or https URL; the body
is read up to BODY_CAP (64 KiB) and never further (a bigger body is judged by its status
code alone); the check's timeout covers the whole exchange, redirects included.  https
certificates are verified against the system's CA store (OpenSSL's default paths, so
SSL_CERT_FILE / SSL_CERT_DIR in the forwarder's environment apply), with the host name.
Bodies are asked for and read uncompressed (a compressed body cannot be a size-capped
health document).  Proxies from the environment are ignored: the check must reach the
URL itself.  Sockets close with a RST, as every probe's do (no TIME_WAIT per probe).

aiohttp's client does the HTTP: it is a dependency already (the admin server), it speaks
HTTP/1.1 and TLS on the running loop (uvloop included), and every bound above maps onto one
of its options.
"""

from __future__ import annotations

import functools
import json
import socket
import ssl
from typing import Any

import aiohttp
import yarl

from ...config.model import CheckConfig, Endpoint
from ...net.sockets import LINGER_RST
from .common import CheckFailed, Progress, Verdict, os_words, quote

BODY_CAP = 64 * 1024
MAX_REDIRECTS = 3
MAX_COMPONENTS = 5  # named in a detail; the rest are counted
_STATES = ("healthy", "degraded", "unhealthy")
_HEADERS = {
    "User-Agent": "forwarder-health-check",
    "Accept": "application/json, */*;q=0.5",
    "Accept-Encoding": "identity",
}


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The verifying client context, built once (loading the CA store costs milliseconds,
    probes run every few seconds)."""
    return ssl.create_default_context()


def _socket(addr_info: tuple[Any, ...]) -> socket.socket:
    family, kind, proto = addr_info[:3]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    return sock


async def check(cfg: CheckConfig, target: Endpoint, progress: Progress) -> Verdict:
    if not cfg.url:
        raise CheckFailed("http check without a url")
    try:
        url = yarl.URL(cfg.url)
    except ValueError:
        raise CheckFailed(f"not a valid URL: {quote(cfg.url)}") from None
    shown = str(url.with_user(None))  # never a password in a detail
    if url.scheme not in ("http", "https") or not url.host:
        raise CheckFailed(f"not an http(s) URL: {quote(shown)}")
    progress.step = f"the response from {shown}"
    connector = aiohttp.TCPConnector(ssl=tls_context(), force_close=True, limit=1,
                                     use_dns_cache=False, socket_factory=_socket)
    async with aiohttp.ClientSession(
            connector=connector, headers=_HEADERS, auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=cfg.timeout), read_bufsize=BODY_CAP,
            trust_env=False) as session:
        try:
            # aiohttp counts the redirect that exceeds the limit as one of them
            async with session.get(url, allow_redirects=True,
                                   max_redirects=MAX_REDIRECTS + 1) as resp:
                body, complete = await _read_capped(resp.content)
                return judge(cfg, resp.status, body, complete, redirected_to=(
                    str(resp.url.with_user(None)) if resp.history else None))
        except aiohttp.ClientError as e:
            if isinstance(e, TimeoutError):
                raise  # aiohttp's own deadline: a timeout like ours
            raise CheckFailed(_words(e, shown)) from None


async def _read_capped(content: aiohttp.StreamReader) -> tuple[bytes, bool]:
    """At most BODY_CAP bytes of the body, and whether that was all of it."""
    buf = bytearray()
    while len(buf) <= BODY_CAP:
        chunk = await content.read(BODY_CAP + 1 - len(buf))
        if not chunk:
            return bytes(buf), True
        buf += chunk
    return bytes(buf[:BODY_CAP]), False


def judge(cfg: CheckConfig, status: int, body: bytes, complete: bool,
          redirected_to: str | None = None) -> Verdict:
    """The verdict on one response: its status code, refined by a health document."""
    where = f"HTTP {status}" + (f" from {redirected_to}" if redirected_to else "")
    wanted = (status in cfg.expect_status if cfg.expect_status else 200 <= status <= 299)
    health = health_document(body) if complete else None
    state, summary = health if health else (None, "")
    said = f", {state}" + (f": {summary}" if summary else "") if state else ""
    if state == "unhealthy":
        return Verdict(False, where + said)
    if not wanted:
        expected = (", ".join(str(s) for s in cfg.expect_status) if cfg.expect_status
                    else "a 2xx")
        return Verdict(False, f"{where}{said} (expected {expected})")
    if state == "degraded":
        drain = cfg.degraded == "drain"
        return Verdict(True, where + said + ("; draining" if drain else ""), drain=drain)
    if not complete:
        return Verdict(True, f"{where}; body over {BODY_CAP // 1024} KiB, not read")
    return Verdict(True, where + said)


def health_document(body: bytes) -> tuple[str, str] | None:
    """(state, the components that are not healthy) of a James-style health document;
    None when the body is not one (then the status code alone decides)."""
    if not body.lstrip().startswith(b"{"):
        return None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested absurdly deep
        return None
    if not isinstance(doc, dict):
        return None
    state = doc.get("status")
    if not isinstance(state, str) or state.lower() not in _STATES:
        return None
    checks = doc.get("checks")
    bad: list[str] = []
    if isinstance(checks, list):
        for c in checks:
            if not isinstance(c, dict):
                continue
            c_state = str(c.get("status", "unknown")).lower()
            if c_state == "healthy":
                continue
            name = c.get("componentName") or c.get("escapedComponentName") or "?"
            cause = c.get("cause")
            text = f"{quote(str(name), 60)} {quote(c_state, 20)[1:-1]}"
            if cause is not None and cause != "":
                text += f" ({quote(str(cause), 120)})"
            bad.append(text)
    summary = ", ".join(bad[:MAX_COMPONENTS])
    if len(bad) > MAX_COMPONENTS:
        summary += f" and {len(bad) - MAX_COMPONENTS} more"
    return state.lower(), summary


def _words(e: aiohttp.ClientError, shown: str) -> str:
    """An aiohttp error as something to act on."""
    if isinstance(e, aiohttp.TooManyRedirects):
        return f"more than {MAX_REDIRECTS} redirects from {shown}"
    if isinstance(e, aiohttp.InvalidUrlRedirectClientError | aiohttp.NonHttpUrlRedirectClientError):
        return f"redirected to something that is not an http(s) URL: {quote(str(e.args[0]))}"
    if isinstance(e, aiohttp.InvalidUrlClientError | aiohttp.NonHttpUrlClientError):
        return f"not an http(s) URL: {quote(shown)}"
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        cert = e.certificate_error
        why = getattr(cert, "verify_message", None) or getattr(cert, "reason", None) or cert
        return f"TLS certificate of {e.host}:{e.port} not accepted: {why}"
    if isinstance(e, aiohttp.ClientConnectorSSLError):
        why = getattr(e.os_error, "reason", None) or os_words(e.os_error)
        return f"TLS handshake with {e.host}:{e.port} failed: {why}"
    if isinstance(e, aiohttp.ClientConnectorDNSError):
        return f"cannot resolve {e.host}: {os_words(e.os_error)}"
    if isinstance(e, aiohttp.ClientConnectorError):
        return f"connect to {e.host}:{e.port}: {os_words(e.os_error)}"
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return f"{shown} closed the connection before a complete response"
    if isinstance(e, aiohttp.ClientResponseError):
        first = (e.message or "").split("\n", 1)[0].strip().rstrip(":")
        return f"not a valid HTTP response from {shown}: {quote(first.lower() or str(e.status))}"
    if isinstance(e, aiohttp.ClientPayloadError):
        return f"the response body from {shown} broke off"
    if isinstance(e, OSError):
        return f"{shown}: {os_words(e)}"
    return f"the request to {shown} failed ({type(e).__name__})"
