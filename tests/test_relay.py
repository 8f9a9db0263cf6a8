"""Bytes arrive intact, both ways, with half-close, under concurrency and hostile peers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import struct
import sysconfig
import threading

import pytest

from forwarder.traffic import core

from .helpers import EchoBackend, forwarder, free_port, pattern, toml_listener, wait_port

LINGER_RST = struct.pack("ii", 1, 0)  # close() sends a RST


@pytest.fixture(params=["core", "python"])
def relay(request: pytest.FixtureRequest) -> str:
    """Both implementations of the one data path: the compiled core (the default when
    built) and the pure-Python splice relay (its fallback, and the reference)."""
    kind: str = request.param
    if kind == "core" and not core.AVAILABLE:
        pytest.skip("the relay core was not built (no C compiler at install time)")
    return kind


def test_the_core_is_built_where_a_compiler_is() -> None:
    """The install step builds the core when gcc and Python's headers are present (CI has
    both): a build that quietly fell back to the Python relay would otherwise pass every
    other test here."""
    if shutil.which("gcc") is None:
        pytest.skip("no gcc here: the Python relay is the one in use")
    include = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        pytest.skip(f"no Python.h in {include} (python3-dev): the Python relay is in use")
    assert core.AVAILABLE, "gcc is here but forwarder.traffic._core was not built"
    assert core.use_core("auto") and not core.use_core("python")


def _tcp_forwarder(port: int, bport: int, relay: str, extra: str = "") -> str:
    return toml_listener(port, bport, mode="tcp", probe="tcp",
                         extra=f'relay = "{relay}"\n{extra}')


def _roundtrip(port: int, payload: bytes, reply_size: int) -> tuple[bytes, bytes]:
    """Send payload, half-close, read everything back: (digest line, reply bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        received = bytearray()

        def reader() -> None:
            while chunk := s.recv(1 << 20):
                received.extend(chunk)

        t = threading.Thread(target=reader)
        t.start()
        view = memoryview(payload)
        for i in range(0, len(payload), 1 << 20):
            s.sendall(view[i:i + (1 << 20)])
        s.shutdown(socket.SHUT_WR)  # half-close: the reply must still come back in full
        t.join(60)
        assert not t.is_alive(), "reader did not see EOF"
    line, _, rest = bytes(received).partition(b"\n")
    return line, rest


@pytest.mark.parametrize("size", [0, 1, 65537, 64 * 1024 * 1024])
def test_integrity_both_directions_with_half_close(size: int, relay: str) -> None:
    port = free_port()
    payload = os.urandom(size)
    reply_size = max(size, 1)
    with EchoBackend(digest_reply=reply_size) as be, \
            forwarder(_tcp_forwarder(port, be.port, relay)):
        wait_port("127.0.0.1", port, "open", 10)
        digest, reply = _roundtrip(port, payload, reply_size)
    assert digest == hashlib.sha256(payload).hexdigest().encode()
    assert len(reply) == reply_size
    assert hashlib.sha256(reply).digest() == hashlib.sha256(pattern(reply_size)).digest()


def test_500_concurrent_connections_all_intact(relay: str) -> None:
    port = free_port()
    n, size = 500, 32 * 1024

    async def one(i: int) -> bool:
        data = hashlib.sha256(str(i).encode()).digest() * (size // 32)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        got = await reader.read()
        writer.close()
        return got == data

    async def all_of_them() -> list[bool]:
        async with asyncio.timeout(60):
            return await asyncio.gather(*(one(i) for i in range(n)))

    with EchoBackend() as be, forwarder(_tcp_forwarder(port, be.port, relay, "backlog = 1024")):
        wait_port("127.0.0.1", port, "open", 10)
        results = asyncio.run(all_of_them())
    assert sum(results) == n


def test_hostile_clients_do_not_disturb_others(relay: str) -> None:
    """Garbage spewers, instant closers and resetters alongside a clean transfer."""
    port = free_port()
    with EchoBackend(digest_reply=1000) as be, \
            forwarder(_tcp_forwarder(port, be.port, relay)) as fw:
        wait_port("127.0.0.1", port, "open", 10)
        stop = threading.Event()
        errors: list[BaseException] = []

        def hostile(kind: int) -> None:
            for _ in range(30):
                if stop.is_set():
                    return
                try:
                    s = socket.create_connection(("127.0.0.1", port), timeout=5)
                    if kind == 0:
                        s.sendall(os.urandom(200_000) + b"\0" * 1000)
                    elif kind == 1:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
                        s.sendall(b"x" * 10)
                    s.close()
                except OSError as e:
                    errors.append(e)

        threads = [threading.Thread(target=hostile, args=(k % 3,)) for k in range(6)]
        for t in threads:
            t.start()
        payload = os.urandom(5_000_000)
        digest, reply = _roundtrip(port, payload, 1000)
        stop.set()
        for t in threads:
            t.join(30)
        assert digest == hashlib.sha256(payload).hexdigest().encode()
        assert reply == pattern(1000)
        assert fw.proc is not None and fw.proc.poll() is None
        # the forwarder still serves after the storm
        digest2, _ = _roundtrip(port, b"after", 1000)
        assert digest2 == hashlib.sha256(b"after").hexdigest().encode()
        assert not [e for e in errors if not isinstance(e, ConnectionError)]
        tracebacks = [e for e in fw.read_events() + fw.events if "Traceback" in str(e)]
        assert not tracebacks


def test_backend_reset_midway_resets_client(relay: str) -> None:
    """A truncated transfer must not look like a clean end: RST, not FIN."""
    port = free_port()

    class Resetter(EchoBackend):
        def handle(self, conn: socket.socket) -> None:
            conn.sendall(b"partial")
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            conn.close()

    with Resetter() as be, forwarder(_tcp_forwarder(port, be.port, relay)):
        wait_port("127.0.0.1", port, "open", 10)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            got = b""
            with pytest.raises(ConnectionResetError):
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    got += chunk
            assert got in (b"", b"partial")


def test_idle_timeout_closes_silent_connection(relay: str) -> None:
    port = free_port()
    with EchoBackend() as be, \
            forwarder(_tcp_forwarder(port, be.port, relay, "idle_timeout = 0.5")) as fw:
        wait_port("127.0.0.1", port, "open", 10)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"ping")
            assert s.recv(10) == b"ping"
            mark = fw.mark()
            s.settimeout(5)
            with pytest.raises(ConnectionResetError):
                while s.recv(10):
                    pass
        ev = fw.wait_event("splice.finished", since=mark, outcome="idle_timeout")
        assert ev["bytes_up"] == 4 and ev["bytes_down"] == 4
