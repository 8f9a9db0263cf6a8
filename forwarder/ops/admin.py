"""Admin HTTP listener: /metrics, /healthz, /readyz, /status, /events, the status page at /,
POST /drain and /resume.

It runs in a thread of its own, with its own event loop (uvloop when importable), because
the gate's loop must never wait on the admin port.  What a scrape costs is chosen by the
clients (how many, how often, how slowly they read) and grows with every backend; on the
gate's loop each millisecond of it is a millisecond in which no listener accepts.  So
/metrics is built on the admin thread: prometheus_client locks its own metrics and the
hot-path families iterate a copy of their children (metrics.py).  The GIL still makes the
threads take turns, but CPython hands it over every switch interval (5 ms): a scrape that
takes a second delays an accept by about that, plus any cyclic-GC pass its allocations
set off (tens of ms for 100,000 samples), instead of by the second.

What reads or changes the forwarder (status, readiness, drain, resume, events) belongs to
the forwarder's loop and runs there.  The admin thread waits for it at most
`Limits.control_timeout` and then answers 503 "forwarder busy"; a call the loop had not
started by then is cancelled, so a drain the client was told failed never happens later.

aiohttp parses HTTP; what it leaves unbounded is bounded here (`Limits`), so that the worst
a client can make the admin thread hold is a fixed budget per connection times a fixed
number of connections.  aiohttp limits each line of a head, not the head (31 lines of 8 KB
cost 0.5 MB once parsed); so a connection gets one request (as before aiohttp) and
`max_head` bytes to send it in, and is answered 413 past that or past aiohttp's line and
header-count limits (aiohttp says 400 for those).  A body is never read:
one over `max_body` or of unknown length is 413.  A client has `read_timeout` to send its
head (aiohttp's keep-alive timer runs from the accept; trickling bytes does not push it
back) and `write_timeout` to take its answer.  Past `connections` open connections a new
one is closed as soon as it is accepted, before a byte is read: half-open clients cannot
take the descriptors the relay needs.  That is why the accept is ours (`_protocol`), not a
`web.SockSite`'s.

The status page (ops/page.py) is built here too, from one such call (status and events)
and from the connection counters, read on this thread as a scrape reads them; a ring of
their snapshots, sampled every few seconds on this thread's loop, gives the last minute.

Drain and resume change the gate, so they are refused (403) from any non-loopback peer,
even when the listener is bound to a public address so that a remote Prometheus can scrape
/metrics.  The peer is the socket's, never a header.  The page's buttons are plain HTML
forms: a browser's POST is answered 303 back to the page (with the JSON body the API gets);
one a browser makes for another site is refused 403 (ops/browsers.py).

Size: one server, its limits, its endpoints and the way back to the forwarder's loop belong
together; what stands alone (the page, telling browsers apart) is in page.py and browsers.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import json
import socket
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..config.model import Endpoint
from . import browsers, metrics, page, supervise

try:
    import uvloop

    LOOP: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
except ImportError:  # the forwarder warns once, at start
    LOOP = None

log = structlog.get_logger("forwarder.admin")
T = TypeVar("T")
Next = Callable[[web.Request], Awaitable[web.StreamResponse]]

START_TIMEOUT = 10.0  # for the thread to be serving
STOP_TIMEOUT = 5.0  # for the thread to end: requests in flight get SHUTDOWN_GRACE twice
SHUTDOWN_GRACE = 1.0


class Controls(Protocol):
    """What the admin port may ask of the forwarder.  Called on the forwarder's loop; each
    returns fresh data that the loop does not touch again (it is encoded on another thread)."""

    def status(self) -> dict[str, Any]: ...

    def readiness(self) -> list[str]: ...

    def drain(self, name: str | None) -> list[str]: ...

    def resume(self, name: str | None) -> list[str]: ...

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        """The recent history (ops/history.py), oldest first: only events whose seq is
        larger than `since`."""
        ...


@dataclass(frozen=True)
class Limits:
    """What one client can make the admin thread hold or wait for."""

    # Admin clients are a few scrapers, people and (later) /events streams.  256 is far
    # above that and far below any descriptor limit the forwarder runs with (at least the
    # usual 1024), so the admin port can never use up the relay's descriptors; all of them
    # holding a full head cost about 10 MB.
    connections: int = 256
    read_timeout: float = 5.0  # to send the request head, from the accept
    write_timeout: float = 10.0  # to take the answer: Prometheus's default scrape_timeout
    control_timeout: float = 2.0  # for the forwarder's loop to run a status/drain call
    max_head: int = 16384  # request line and headers (one line: at most aiohttp's 8190)
    max_headers: int = 32  # a browser sends about 20 (aiohttp allows 128)
    max_body: int = 1024  # no endpoint reads a body; a small one is ignored


LIMITS = Limits()


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=(json.dumps(data, indent=2) + "\n").encode(),
                        content_type="application/json", headers=headers)


_HEAD_TOO_LARGE = (b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: text/plain\r\n"
                   b"Content-Length: 23\r\nConnection: close\r\n\r\nrequest head too large\n")


def _since(request: web.Request) -> int:
    try:
        since = int(request.query.get("since", "0"))
    except ValueError:
        since = -1
    if since < 0:
        raise web.HTTPBadRequest(text="since must be an event's seq (an integer >= 0)\n")
    return since


class _Handler(web.RequestHandler):
    """aiohttp's connection protocol, answering in our terms: one request per connection in
    at most `budget` bytes, a head over the limits is 413, errors go to structlog (aiohttp
    would print tracebacks through stdlib logging, which nothing configures here), and the
    connection leaves `live` when it ends."""

    def __init__(self, manager: web.Server, live: weakref.WeakSet[_Handler], budget: int,
                 **kw: Any) -> None:
        super().__init__(manager, **kw)
        self.live, self.budget = live, budget
        self.taken = False  # its request reached the app (or an error answer): read no more
        self.lingering = False  # answered 413 for its size: reading on only until it closes

    def data_received(self, data: bytes) -> None:
        if self.taken:
            return  # the one request is being answered; the rest is never parsed
        self.budget -= len(data)
        if self.budget >= 0:
            super().data_received(data)
            return
        # Nothing is being answered yet (not taken), so this answer cannot interleave.  The
        # rest is read and dropped until the client closes or read_timeout: closing with
        # its bytes unread would send a reset that can destroy the answer before it is read.
        peer = self.peername
        log.debug("admin.bad_request", status=413, error="request head too large",
                  peer=peer[0] if isinstance(peer, tuple) else peer)
        self.taken = self.lingering = True
        if self.transport is not None:
            self.transport.write(_HEAD_TOO_LARGE)
            self.transport.write_eof()

    def eof_received(self) -> bool:  # type: ignore[override]  # asyncio's: bool | None
        """A client may half-close once its request is sent (`nc -N`): keep the connection
        to answer it, unless what it sent held no request (aiohttp's count of the requests
        it parsed; were it gone, the read timeout would end the connection) or was too
        large and is answered.  aiohttp alone closes on any EOF."""
        if self.lingering:
            return False
        return bool(self.taken or getattr(self, "_request_count", 1))

    def connection_lost(self, exc: BaseException | None) -> None:
        self.live.discard(self)
        super().connection_lost(exc)

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        self.taken = True
        if isinstance(exc, LineTooLong) or (
                isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc)):
            status, message = 413, "request head too large"
        if status >= 500:
            if not isinstance(exc, ConnectionError):
                log.error("admin.error", status=status, path=request.path, exc_info=exc)
            message = "internal error"
        else:
            log.debug("admin.bad_request", status=status, peer=request.remote,
                      error=message or str(exc))
        if request.writer.output_size > 0:
            raise ConnectionError("answer already under way; cannot send an error")
        resp = _text(status, f"{message or status}\n")
        resp.force_close()
        return resp

    def log_exception(self, *args: Any, **kw: Any) -> None:
        log.error("admin.error", detail=str(args[0]) if args else "",
                  exc_info=kw.get("exc_info", True))


class _Refuse(asyncio.Protocol):
    """A connection past the cap: closed as soon as it is accepted."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _Admin:
    """The admin thread: its loop, the aiohttp application, the way back to the forwarder."""

    def __init__(self, sock: socket.socket, controls: Controls, limits: Limits,
                 dashboard_url: str | None = None) -> None:
        self.sock, self.controls, self.limits = sock, controls, limits
        self.dashboard_url = dashboard_url
        self.outcomes = page.Outcomes()  # touched on the admin thread only
        self.main = asyncio.get_running_loop()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping: asyncio.Event | None = None
        self.ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.live: weakref.WeakSet[_Handler] = weakref.WeakSet()
        self.refused = 0
        self.thread = threading.Thread(target=self._run, name="admin", daemon=True)

    def app(self) -> web.Application:
        """One route per endpoint (a streaming handler, such as an /events stream would be,
        writes its answer itself, so it bounds its own writes)."""
        app = web.Application(middlewares=[self.guard])
        app.add_routes([
            web.get("/", self.status_page),
            web.get("/events", self.events),
            web.get("/metrics", self.metrics),
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
            web.get("/status", self.status),
            web.post("/drain", self.drain),
            web.post("/resume", self.resume),
        ])
        return app

    # --- endpoints (HEAD comes with every GET: aiohttp sends the headers only) -----------

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=generate_latest(metrics.REGISTRY),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return _text(200, "ok\n")

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        why = await self.call(self.controls.readiness)
        if why:
            return _text(503, "".join(f"{w}\n" for w in why))
        return _text(200, "ready\n")

    async def status(self, request: web.Request) -> web.StreamResponse:
        return _json(await self.call(self.controls.status))

    async def events(self, request: web.Request) -> web.StreamResponse:
        since = _since(request)
        return _json(await self.call(lambda: self.controls.events(since)))

    async def status_page(self, request: web.Request) -> web.StreamResponse:
        refresh = request.query.get("refresh", str(page.REFRESH))
        try:
            every = int(refresh)
        except ValueError:
            raise web.HTTPBadRequest(text="refresh must be a number of seconds\n") from None
        every = 0 if every <= 0 else min(max(every, 2), 3600)
        c = self.controls
        st, evs = await self.call(lambda: (c.status(), c.events(0)))
        body = page.render(st, evs, self.outcomes.table(), now=time.time(),
                           dashboard_url=self.dashboard_url, refresh=every)
        return web.Response(text=body, content_type="text/html", charset="utf-8",
                            headers=page.HEADERS)

    async def drain(self, request: web.Request) -> web.StreamResponse:
        return await self.gate(request, "drain", self.controls.drain)

    async def resume(self, request: web.Request) -> web.StreamResponse:
        return await self.gate(request, "resume", self.controls.resume)

    async def gate(self, request: web.Request, action: str,
                   fn: Callable[[str | None], list[str]]) -> web.StreamResponse:
        peer = request.remote or ""
        if not _is_loopback(peer):
            log.warning("admin.forbidden", path=request.path, peer=peer)
            return _text(403, "drain/resume only from loopback\n")
        why = browsers.cross_site(request)
        if why is not None:
            log.warning("admin.forbidden", path=request.path, peer=peer, reason=why)
            return _text(403, f"drain/resume refused from another site: {why}\n")
        name = request.query.get("listener")
        done = await self.call(lambda: fn(name))
        if not done:
            return _text(404, f"no listener {name!r}\n")
        log.info(f"admin.{action}", listeners=done, peer=peer)
        if browsers.wants_page(request):  # back to the page, which shows what changed
            return _json({action: done}, 303, {"Location": "./"})
        return _json({action: done})

    @web.middleware
    async def guard(self, request: web.Request, handler: Next) -> web.StreamResponse:
        """Refuse a body we would not read (over max_body, or of unknown length); give the
        client write_timeout to take the answer, then drop it.  One request a connection."""
        if isinstance(request.protocol, _Handler):
            request.protocol.taken = True
        resp: web.StreamResponse
        if request.body_exists and (request.content_length is None
                                    or request.content_length > self.limits.max_body):
            resp = _text(413, "request body too large\n")
            resp.force_close()
            return resp
        try:
            resp = await handler(request)
        except web.HTTPException as e:  # 404, 405, 503: written here too, then closed
            resp = web.Response(status=e.status, reason=e.reason, text=e.text,
                                headers=e.headers)
        resp.force_close()
        try:
            async with asyncio.timeout(self.limits.write_timeout):
                await resp.prepare(request)
                await resp.write_eof()
        except TimeoutError:
            log.info("admin.write_timeout", peer=request.remote, path=request.path)
            if request.transport is not None:
                request.transport.abort()
        except ConnectionError:  # the client left: aiohttp finds out again, quietly
            pass
        return resp

    async def call(self, fn: Callable[[], T]) -> T:
        """fn() on the forwarder's loop, or 503 if that loop has not run it in time."""
        cf: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if cf.set_running_or_notify_cancel():
                try:
                    cf.set_result(fn())
                except Exception as e:
                    cf.set_exception(e)

        try:
            self.main.call_soon_threadsafe(run)
        except RuntimeError:  # its loop is closed: the forwarder is on its way out
            raise web.HTTPServiceUnavailable(text="forwarder stopping\n") from None
        fut = asyncio.wrap_future(cf)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.limits.control_timeout)
        except TimeoutError:
            if not cf.cancel():  # it started in time and is running now: a plain call
                return await fut
        log.warning("admin.busy", timeout=self.limits.control_timeout)
        raise web.HTTPServiceUnavailable(text="forwarder busy\n")

    # --- the thread --------------------------------------------------------------------

    async def sample(self) -> None:
        """Snapshots of the connection counters, for the page's last minute."""
        while True:
            try:
                self.outcomes.sample()
            except Exception:
                supervise.internal_error("admin", "admin.sample_failed")
            await asyncio.sleep(page.SAMPLE_EVERY)  # a clock, not a synchronisation

    def _protocol(self, server: web.Server, kw: dict[str, Any]) -> asyncio.BaseProtocol:
        """The accept: a connection past the cap is refused before it costs more than a
        descriptor for a moment; the first and the last refusal of a run are logged."""
        if len(self.live) >= self.limits.connections:
            if not self.refused:
                log.warning("admin.full", connections=self.limits.connections)
            self.refused += 1
            return _Refuse()
        if self.refused:
            log.info("admin.not_full", refused=self.refused)
            self.refused = 0
        handler = _Handler(server, self.live, self.limits.max_head + self.limits.max_body, **kw)
        self.live.add(handler)
        return handler

    async def serve(self) -> None:
        loop = self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=SHUTDOWN_GRACE)
        await runner.setup()
        try:
            server = runner.server
            assert server is not None
            lim = self.limits
            line = min(8190, lim.max_head)
            kw = {"loop": loop, "access_log": None, "keepalive_timeout": lim.read_timeout,
                  "lingering_time": 0, "max_line_size": line, "max_field_size": line,
                  "max_headers": lim.max_headers}
            listener = await loop.create_server(lambda: self._protocol(server, kw),
                                                sock=self.sock)
            sampler = asyncio.create_task(self.sample())
            self.ready.set_result(None)
            await self.stopping.wait()
            sampler.cancel()
            listener.close()
        finally:
            await runner.cleanup()

    def _run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=LOOP) as r:
                r.run(self.serve())
        except Exception as e:
            if self.ready.done():
                log.exception("admin.crashed")
            else:
                self.ready.set_exception(e)
        finally:
            if not self.ready.done():
                self.ready.set_exception(RuntimeError("the admin thread ended at start"))
            self.done.set_result(None)

    async def stop(self) -> None:
        """Stop accepting, end the connections (a request in flight gets SHUTDOWN_GRACE)
        and join the thread, waiting at most STOP_TIMEOUT without blocking the loop."""
        if self.loop is not None and self.stopping is not None:
            with contextlib.suppress(RuntimeError):  # its loop is closed: the thread ended
                self.loop.call_soon_threadsafe(self.stopping.set)
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self.done)),
                                   STOP_TIMEOUT)
        except TimeoutError:
            log.warning("admin.stop_timeout", timeout=STOP_TIMEOUT)
            return
        self.thread.join(STOP_TIMEOUT)  # done is the thread's last act: this is immediate


async def start(sock: socket.socket, controls: Controls, limits: Limits = LIMITS, *,
                dashboard_url: str | None = None) -> Callable[[], Awaitable[None]]:
    """Serve on `sock` (bound, not listening: bound before the privilege drop) from the
    admin thread; return an async stopper.  Called on the forwarder's loop.
    `dashboard_url`: a Grafana dashboard the status page links to."""
    host, port = sock.getsockname()[:2]
    admin = _Admin(sock, controls, limits, dashboard_url)
    admin.thread.start()
    await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(admin.ready)), START_TIMEOUT)
    log.info("admin.listening", address=str(Endpoint(host, port)))
    return admin.stop
