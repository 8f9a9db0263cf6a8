"""Tiny real servers on loopback for the probe tests, run in the test's own event loop.

`serve(handler)` starts an asyncio stream server whose connections are all aborted when
the block ends (a handler that hangs on purpose must not outlive its test);
`refusing_port()` is a bound socket that does not listen (connect: refused, and the port
cannot be taken by anyone else meanwhile); `blackhole()` is a listener whose accept queue
is full, so a SYN is dropped and the connect hangs (a timeout without any sleep).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

from forwarder.config.model import Endpoint

# Timing of the near-timeout tests: checks run with timeout T; a slow backend answers at
# INSIDE (up) or OUTSIDE (timeout); a timed-out check returns within LATE of T.
T = 0.25
INSIDE = T - 0.1
OUTSIDE = T + 0.1
LATE = 0.2

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Served:
    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.connections = 0
        # how each connection ended on the server side: None (the handler returned) or
        # the error it ended with (ConnectionResetError: the probe closed with a RST)
        self.ended: asyncio.Queue[BaseException | None] = asyncio.Queue()


@contextlib.asynccontextmanager
async def serve(handler: Handler, host: str = "127.0.0.1") -> AsyncIterator[Served]:
    writers: set[asyncio.StreamWriter] = set()
    served: Served

    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.connections += 1
        writers.add(writer)
        outcome: BaseException | None = None
        try:
            await handler(reader, writer)
        except (OSError, asyncio.IncompleteReadError) as e:
            outcome = e
        finally:
            served.ended.put_nowait(outcome)
            writers.discard(writer)
            writer.transport.abort()

    server = await asyncio.start_server(wrapped, host, 0)
    port = server.sockets[0].getsockname()[1]
    served = Served(Endpoint(host, port))
    try:
        yield served
    finally:
        server.close()
        for w in list(writers):
            w.transport.abort()
        await server.wait_closed()


def answer(data: bytes, delay: float = 0.0) -> Handler:
    """A handler that waits `delay`, sends `data`, then reads until the peer closes
    (raising ConnectionResetError if it closes with a RST)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if delay:
            await asyncio.sleep(delay)  # the behaviour under test: a slow backend
        writer.write(data)
        await writer.drain()
        await reader.read()
    return handler


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accept and never say a word (a hung JVM)."""
    await reader.read()


@contextlib.contextmanager
def refusing_port(host: str = "127.0.0.1") -> Iterator[Endpoint]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        yield Endpoint(host, s.getsockname()[1])


@contextlib.contextmanager
def blackhole(host: str = "127.0.0.1") -> Iterator[tuple[Endpoint, socket.socket]]:
    """A listener with backlog 0 and one connection queued that nobody accepts: the queue
    is full, the kernel drops further SYNs, a connect hangs (retried by its SYN timer,
    first after 1 s).  Accepting the queued connection makes room again."""
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        lst.bind((host, 0))
        lst.listen(0)
        filler.settimeout(2)
        filler.connect(lst.getsockname())  # completes at once: the queue takes one
        yield Endpoint(host, lst.getsockname()[1]), lst
    finally:
        filler.close()
        lst.close()
