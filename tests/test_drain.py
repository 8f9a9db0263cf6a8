"""Clients queued when the gate closes get an answer (421), never a reset."""

from __future__ import annotations

import asyncio
import signal
import socket

from forwarder.config import Endpoint
from forwarder.gate import Gate
from forwarder.metrics import ListenerMetrics
from forwarder.system import bind

from .helpers import SmtpBackend, forwarder, free_port, smtp_reply, toml_listener, wait_port


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
        assert len(handed) == 5
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
