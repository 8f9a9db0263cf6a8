"""A gate whose listen() fails keeps the prober alive, says why, retries, and opens as soon
as the port is free again (issue 11, bug 1), in-process on real loopback sockets."""

from __future__ import annotations

import asyncio
import socket

import uvloop

from forwarder.config.model import BackendConfig, Endpoint, ListenerConfig, ProbeConfig
from forwarder.ops.metrics import REGISTRY
from forwarder.ops.system import bind
from forwarder.traffic.listener import Listener
from tests.helpers import connect_result, free_port, until


def test_failed_listen_is_retried_and_probes_go_on() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        port, bport = free_port(), free_port()
        backend = socket.socket()
        backend.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        backend.bind(("127.0.0.1", bport))
        backend.listen(64)
        lc = ListenerConfig(name="stolen", addresses=("127.0.0.1",), port=port, mode="tcp",
                            backends=(BackendConfig(Endpoint("127.0.0.1", bport), local=True),),
                            probe=ProbeConfig(kind="tcp", interval=0.05, fast_interval=0.02,
                                              rise=1, fall=1, jitter=0))
        sock = bind(Endpoint("127.0.0.1", port))
        # what the first build allowed: the closed gate's socket shares the port, and
        # another process binds and listens on it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        thief = socket.socket()
        thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        thief.bind(("127.0.0.1", port))
        thief.listen(8)
        lst = Listener(lc, [sock], "mx.test")
        await lst.start()
        b = lst.pool.backends[0]
        # the backend is up, listen() keeps failing
        await until(lambda: lst.gate.open_failures >= 2, 5, "two failed listen() calls")
        st = lst.status()["gate"]
        assert st["state"] == "closed" and st["reason"] == "open_failed"
        assert st["open_error"]["errno"] == "EADDRINUSE"
        fails = REGISTRY.get_sample_value("forwarder_gate_open_failures_total",
                                          {"listener": "stolen", "errno": "EADDRINUSE"})
        assert fails is not None and fails >= 2
        probes = len(b.history)
        # the prober did not die with the gate action
        await until(lambda: len(b.history) >= probes + 3, 5, "three more probes")
        thief.close()  # the port is free again: the next retry opens the gate
        await until(lambda: lst.gate.is_open, 10, "the gate to open after the retry")
        assert lst.gate.open_error is None and lst.gate.reason == "open_retry"
        assert await loop.run_in_executor(None, connect_result, "127.0.0.1", port) == "open"
        await lst.stop(1)
        backend.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        r.run(main())
