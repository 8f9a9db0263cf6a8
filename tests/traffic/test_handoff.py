"""The hand-off in-process, against real loopback sockets in the test's own (uv)loop: each
rule of traffic/handoff.py pinned so that a failure names its cause."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

import pytest
import uvloop

from forwarder.config.model import BackendConfig, Endpoint, ProbeConfig
from forwarder.health.backends import Backend, sockaddr_of
from forwarder.ops.metrics import REGISTRY
from forwarder.traffic.deadlines import Deadlines
from forwarder.traffic.handoff import Handoff, Plan, dial
from forwarder.traffic.poller import Poller

BOUND = 10.0


def run(coro: Coroutine[Any, Any, None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(BOUND):
            await coro
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        r.run(bounded())


class Outcome:
    """The Sink: records what the hand-off decided, and when."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done: asyncio.Future[tuple[str, Any]] = loop.create_future()
        self.loop = loop
        self.at = 0.0

    def ready(self, h: Handoff, greeting: bytes) -> None:
        self.at = self.loop.time()
        self.done.set_result(("ready", (h.backend, h.bs, greeting)))

    def refused(self, h: Handoff, outcome: str) -> None:
        self.at = self.loop.time()
        self.done.set_result(("refused", outcome))


def backend(port: int, greeting: float = 2.0) -> Backend:
    """A real Backend (its prober not started) with a fixed greeting deadline."""
    ep = Endpoint("127.0.0.1", port)
    sa = sockaddr_of(ep)
    assert sa is not None
    return Backend(BackendConfig(ep), ProbeConfig(rise=1, fall=1), lambda b: None, None,
                   "static", sa, (greeting, 10.0))


def passive(b: Backend, reason: str) -> float:
    v = REGISTRY.get_sample_value("forwarder_backend_passive_failures_total",
                                  {"backend": b.name, "reason": reason})
    return v or 0.0


def refusing_port() -> socket.socket:
    """Bound, not listening: a connect is refused, and nobody else can take the port."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


async def server(handler: Callable[[socket.socket], Coroutine[Any, Any, None]]
                 ) -> tuple[socket.socket, asyncio.Event, asyncio.Task[None]]:
    """A listening socket whose accepted connections go to `handler`; the event is set
    at the first accept."""
    loop = asyncio.get_running_loop()
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(16)
    ls.setblocking(False)
    accepted = asyncio.Event()
    keep: list[object] = []  # accepted sockets and their handler tasks live as long as ls

    async def accept_loop() -> None:
        while True:
            c, _ = await loop.sock_accept(ls)
            keep.extend((c, loop.create_task(handler(c))))
            accepted.set()
    return ls, accepted, loop.create_task(accept_loop())


async def greets(c: socket.socket) -> None:
    await asyncio.get_running_loop().sock_sendall(c, b"220 backend ready\r\n")


async def silent(c: socket.socket) -> None:
    return None


async def closes(c: socket.socket) -> None:
    c.close()


class Rig:
    """A client/forwarder-side socket pair plus the Plan under test."""

    def __init__(self, *, smtp: bool = True, proxy: str | None = None,
                 connect_timeout: float = 2.0) -> None:
        self.loop = asyncio.get_running_loop()
        self.sink = Outcome(self.loop)
        self.deadlines = Deadlines(self.loop)
        self.plan = Plan(sink=self.sink, poller=Poller.for_loop(self.loop),
                         deadlines=self.deadlines, dial=partial(dial, options=lambda s: None),
                         smtp=smtp, proxy=proxy, connect_timeout=connect_timeout)
        ls = socket.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        self.client = socket.create_connection(ls.getsockname())
        self.conn, self.addr = ls.accept()
        self.conn.setblocking(False)
        ls.close()

    def handoff(self, backends: list[Backend]) -> Handoff:
        h = Handoff(self.plan, self.conn, self.addr, backends)
        self.t0 = self.loop.time()
        h.start()
        return h

    def close(self) -> None:
        self.client.close()
        self.conn.close()
        self.deadlines.close()


def test_refused_backend_counts_a_passive_failure_and_the_next_one_is_tried() -> None:
    async def main() -> None:
        rig = Rig()
        dead = refusing_port()
        ls, _, task = await server(greets)
        b1, b2 = backend(dead.getsockname()[1]), backend(ls.getsockname()[1])
        rig.handoff([b1, b2])
        kind, (b, bs, greeting) = await rig.sink.done
        assert kind == "ready" and b is b2 and greeting == b"220 backend ready\r\n"
        assert passive(b1, "connect") == 1
        assert passive(b2, "connect") == 0
        bs.close()
        task.cancel()
        ls.close()
        dead.close()
        rig.close()
    run(main())


@pytest.mark.parametrize("proxy", [None, "v1"])
def test_silent_backend_gets_a_refusal_at_the_greeting_deadline_within_10ms(
        proxy: str | None) -> None:
    async def main() -> None:
        rig = Rig(proxy=proxy)
        ls, _, task = await server(silent)
        b = backend(ls.getsockname()[1], greeting=0.3)
        rig.handoff([b])
        kind, outcome = await rig.sink.done
        late = rig.sink.at - rig.t0 - 0.3
        assert (kind, outcome) == ("refused", "backend_failed_421")
        assert -0.002 <= late < 0.010, f"deadline missed by {late * 1000:.1f} ms"
        assert passive(b, "greeting") == 1
        task.cancel()
        ls.close()
        rig.close()
    run(main())


def test_close_before_greeting_moves_on_to_the_next_backend() -> None:
    async def main() -> None:
        rig = Rig()
        bad, _, t1 = await server(closes)
        good, _, t2 = await server(greets)
        b1, b2 = backend(bad.getsockname()[1]), backend(good.getsockname()[1])
        rig.handoff([b1, b2])
        kind, (b, bs, greeting) = await rig.sink.done
        assert kind == "ready" and b is b2 and greeting.startswith(b"220 ")
        assert passive(b1, "greeting") == 1
        bs.close()
        for t in (t1, t2):
            t.cancel()
        bad.close()
        good.close()
        rig.close()
    run(main())


def test_proxy_header_is_the_first_thing_the_backend_reads() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        got: asyncio.Future[bytes] = loop.create_future()

        async def reads(c: socket.socket) -> None:
            c.setblocking(False)
            got.set_result(await loop.sock_recv(c, 200))
            await loop.sock_sendall(c, b"220 after proxy\r\n")

        rig = Rig(proxy="v1")
        ls, _, task = await server(reads)
        rig.handoff([backend(ls.getsockname()[1])])
        kind, (_, bs, greeting) = await rig.sink.done
        cport = rig.client.getsockname()[1]
        assert (await got).startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 %d " % cport)
        assert kind == "ready" and greeting == b"220 after proxy\r\n"
        bs.close()
        task.cancel()
        ls.close()
        rig.close()
    run(main())


def test_tcp_mode_is_ready_at_connect_without_waiting_for_a_byte() -> None:
    async def main() -> None:
        rig = Rig(smtp=False)
        ls, _, task = await server(silent)
        rig.handoff([backend(ls.getsockname()[1])])
        kind, (_, bs, greeting) = await rig.sink.done
        assert kind == "ready" and greeting == b""
        assert rig.sink.at - rig.t0 < 0.5
        bs.close()
        task.cancel()
        ls.close()
        rig.close()
    run(main())


def test_no_candidates_is_no_backend() -> None:
    async def main() -> None:
        rig = Rig()
        rig.handoff([])
        assert await rig.sink.done == ("refused", "no_backend_421")
        rig.close()
    run(main())


def test_unanswered_syn_is_a_connect_failure_at_connect_timeout() -> None:
    """A listener whose accept queue is full drops SYNs: the connect neither fails nor
    completes, and the direct-to-greeting path must call that a connect failure."""
    async def main() -> None:
        ls = socket.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen(0)  # one connection fills the accept queue
        filler = [socket.create_connection(ls.getsockname(), timeout=2)]
        rig = Rig(connect_timeout=0.3)
        b = backend(ls.getsockname()[1])
        rig.handoff([b])
        kind, outcome = await rig.sink.done
        assert (kind, outcome) == ("refused", "backend_failed_421")
        assert 0.29 <= rig.sink.at - rig.t0 < 0.4
        assert passive(b, "connect") == 1
        for f in filler:
            f.close()
        ls.close()
        rig.close()
    run(main())


def test_release_moves_a_waiting_handoff_on_at_once() -> None:
    """A down verdict for the backend it waits on: next backend now, not at the deadline."""
    async def main() -> None:
        rig = Rig()
        hung, accepted, t1 = await server(silent)
        good, _, t2 = await server(greets)
        b1, b2 = backend(hung.getsockname()[1], 5.0), backend(good.getsockname()[1])
        h = rig.handoff([b1, b2])
        await accepted.wait()  # the hung backend has accepted: the hand-off waits on it
        assert h.waiting and h.backend is b1
        t = time.monotonic()
        h.release("backend down")
        kind, (b, bs, _) = await rig.sink.done
        assert kind == "ready" and b is b2 and time.monotonic() - t < 0.5
        assert passive(b1, "greeting") == 0
        bs.close()
        for task in (t1, t2):
            task.cancel()
        hung.close()
        good.close()
        rig.close()
    run(main())
