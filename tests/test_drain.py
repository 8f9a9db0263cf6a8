"""Clients queued when the gate closes get an answer (421), never a reset."""

from __future__ import annotations

import asyncio
import errno
import select
import signal
import socket
import struct

from forwarder.config.model import Endpoint
from forwarder.ops.metrics import ListenerMetrics
from forwarder.ops.system import bind
from forwarder.traffic.gate import Gate

from .helpers import (
    SmtpBackend,
    forwarder,
    free_port,
    smtp_reply,
    toml_listener,
    wait_port,
    wait_until,
)


def test_gate_accepts_queue_before_unlistening() -> None:
    """The mechanism, in-process: queued handshakes are accepted and handed over on close;
    afterwards the port refuses."""

    async def main() -> None:
        port = free_port()  # an explicit port: a port-0 bind is released by shutdown()
        sock = bind(Endpoint("127.0.0.1", port))
        handed: list[socket.socket] = []
        gate = Gate("drain-unit", [sock], 16, lambda c, a: handed.append(c),
                    ListenerMetrics("drain-unit"))
        gate.set_healthy(True)
        # no await between connect and close: the loop never ran the accept callback, so
        # these clients sit in the kernel's accept queue
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(5)]
        gate.set_healthy(False)
        assert not gate.is_open
        assert len(handed) == 5  # answered at once, not after the settle
        # new SYNs are dropped while handshakes in flight settle, then the port refuses
        deadline = asyncio.get_running_loop().time() + 2
        while gate.settling:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)  # the settle timer runs on this loop
        by_peer = {c.getsockname(): c for c in clients}
        for srv in handed:
            srv.setblocking(True)
            c = by_peer[srv.getpeername()]
            srv.sendall(b"421 4.3.2 test\r\n")
            srv.close()
            assert c.recv(100) == b"421 4.3.2 test\r\n"
            c.close()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            raise AssertionError("port still accepts after the gate closed")
        except ConnectionRefusedError:
            pass
        # and it can open again on the same bound socket (no re-bind)
        gate.set_healthy(True)
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        gate.set_healthy(False)
        sock.close()

    asyncio.run(main())


def test_queued_clients_get_421_when_backend_dies() -> None:
    """End to end: freeze the forwarder, queue clients, kill the backend, thaw it."""
    port = free_port()
    be = SmtpBackend().start()
    try:
        with forwarder(toml_listener(port, be.port, interval=0.2, rise=1, fall=1)) as fw:
            wait_port("127.0.0.1", port, "open", 10)
            fw.signal(signal.SIGSTOP)
            try:
                clients = [socket.create_connection(("127.0.0.1", port), timeout=5)
                           for _ in range(8)]
                be.stop()
            finally:
                fw.signal(signal.SIGCONT)
            for c in clients:
                reply = smtp_reply(c, timeout=10)
                assert reply.startswith(b"421 4.3.2 "), reply
                c.close()
            fw.wait_event("gate.closed", timeout=5)
    finally:
        be.stop()


def test_closing_gate_drops_new_syns_until_it_has_left_listen() -> None:
    """While a closing gate settles, a new SYN is dropped (its client retries and is then
    refused), never completed into a queue that shutdown() would reset."""

    async def main() -> None:
        port = free_port()
        sock = bind(Endpoint("127.0.0.1", port))
        handed: list[socket.socket] = []
        gate = Gate("settle-unit", [sock], 16, lambda c, a: handed.append(c),
                    ListenerMetrics("settle-unit"))
        gate.set_healthy(True)
        gate.set_healthy(False)
        assert _settling(gate)
        dropped = _drops(sock)
        c = socket.socket()
        c.setblocking(False)
        assert c.connect_ex(("127.0.0.1", port)) == errno.EINPROGRESS
        # The kernel's word that the SYN reached the listener and was dropped there: its
        # drop counter moves.  A blocking wait: this loop does not run meanwhile, so the
        # settle timer cannot end the settling under the test's feet, however slow we are.
        wait_until(lambda: _drops(sock) > dropped, 5, "the listener to drop the SYN")
        assert _settling(gate)
        assert _tcp_state(c) == TCP_SYN_SENT, "a SYN completed while the gate was closing"
        assert c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        try:
            peer = c.getpeername()
        except OSError:
            peer = None  # not connected: the SYN was dropped
        assert peer is None, "a SYN completed while the gate was closing"
        deadline = asyncio.get_running_loop().time() + 2
        while _settling(gate):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)  # the settle timer runs on this loop
        # the client's retransmitted SYN (after its 1 s RTO) meets a closed port: refused
        _, writable, _ = select.select([], [c], [], 10)
        assert writable, "the dropped client got no answer to its retried SYN"
        assert c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED
        c.close()
        assert not handed
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            raise AssertionError("port still accepts after the gate closed")
        except ConnectionRefusedError:
            pass
        sock.close()

    asyncio.run(main())


SO_MEMINFO = 55  # linux/socket.h: u32 sk_meminfo[SK_MEMINFO_VARS]
SK_MEMINFO_DROPS = 8
TCP_SYN_SENT = 2  # linux/tcp_states.h


def _drops(sock: socket.socket) -> int:
    """Segments the kernel dropped for this socket (sk_drops: a socket filter's verdict
    counts here, as `ss -m` shows in d<N>)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * 9)
    return int(struct.unpack(f"{len(raw) // 4}I", raw)[SK_MEMINFO_DROPS])


def _tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def _settling(gate: Gate) -> bool:
    return gate.settling  # a call: mypy would otherwise keep the narrowed value
