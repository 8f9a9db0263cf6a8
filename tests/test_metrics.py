"""Every connection outcome counter moves in the scenario that causes it; the other
series exist from the start (exported as 0)."""

from __future__ import annotations

import signal
import socket
import struct
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from .helpers import (
    SmtpBackend,
    _ThreadServer,
    forwarder,
    free_port,
    smtp_reply,
    toml_listener,
    wait_port,
    wait_until,
)


def outcomes(admin: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "forwarder_connections":
            for s in fam.samples:
                if s.name == "forwarder_connections_total":
                    out[s.labels["outcome"]] = s.value
    return out


def test_outcome_counters_move() -> None:
    port, admin, bport = free_port(), free_port(), free_port()
    extra = "idle_timeout = 0.5\n[listener.access]\nper_source = 2\nno_access = ['127.0.0.9']\n"
    cfg = toml_listener(port, bport, interval=0.1, rise=1, fall=1, extra=extra,
                        top=f'admin = "127.0.0.1:{admin}"')
    with forwarder(cfg) as fw:
        fw.wait_event("admin.listening")
        start = outcomes(admin)
        assert set(start) >= {"spliced", "no_backend_421", "backend_failed_421",
                              "refused_acl", "rate_limited", "idle_timeout", "error"}
        assert all(v == 0 for v in start.values())

        def moved(name: str, by: float = 1) -> None:
            wait_until(lambda: outcomes(admin)[name] >= start[name] + by, 10,
                       f"{name} to move")

        with SmtpBackend(bport):
            wait_port("127.0.0.1", port, "open", 10)
            # spliced
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                assert smtp_reply(s).startswith(b"220")
                s.sendall(b"QUIT\r\n")
                smtp_reply(s)
            moved("spliced")
            # refused_acl: a source in no_access
            with socket.create_connection(("127.0.0.1", port), timeout=5,
                                          source_address=("127.0.0.9", 0)) as s:
                s.settimeout(5)
                assert s.recv(10) == b""
            moved("refused_acl")
            # rate_limited: a third concurrent connection from one address
            held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
            for h in held:
                smtp_reply(h)
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                assert smtp_reply(s).startswith(b"421 4.7.0 ")
            moved("rate_limited")
            # idle_timeout: the two held connections say nothing
            moved("idle_timeout", 2)
            for h in held:
                h.close()
        # backend_failed_421: clients queued while the forwarder is frozen find the
        # backend gone when it thaws
        wait_port("127.0.0.1", port, "refused", 10)
        with SmtpBackend(bport) as be:
            wait_port("127.0.0.1", port, "open", 10)
            fw.signal(signal.SIGSTOP)
            try:
                queued = [socket.create_connection(("127.0.0.1", port), timeout=5,
                                                   source_address=(f"127.0.0.{20 + i}", 0))
                          for i in range(4)]
                be.stop()
            finally:
                fw.signal(signal.SIGCONT)
            for q in queued:
                assert smtp_reply(q).startswith(b"421 ")
                q.close()
        moved("backend_failed_421")

        # error: a backend that greets, then resets
        class Resetter(_ThreadServer):
            def handle(self, conn: socket.socket) -> None:
                conn.sendall(b"220 hi\r\n")
                if conn.recv(10).startswith(b"QUIT"):  # the probe
                    conn.sendall(b"221 bye\r\n")
                    return
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()

        with Resetter(bport):
            wait_port("127.0.0.1", port, "open", 10)
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                smtp_reply(s)
                s.sendall(b"EHLO x\r\n")
                s.settimeout(5)
                try:
                    while s.recv(100):
                        pass
                except ConnectionResetError:
                    pass
            moved("error")


def test_no_backend_421_when_the_gate_is_open_without_a_live_backend() -> None:
    """The window between a backend dying and the gate closing, held open on purpose:
    in-process, with the gate forced open while the pool has no live backend."""
    import asyncio

    from forwarder.config.model import BackendConfig, Endpoint, ListenerConfig, ProbeConfig
    from forwarder.ops.system import bind
    from forwarder.traffic.listener import Listener

    async def main() -> bytes:
        port, dead = free_port(), free_port()
        lc = ListenerConfig(name="nb", addresses=("127.0.0.1",), port=port,
                            backends=(BackendConfig(Endpoint("127.0.0.1", dead), local=True),),
                            probe=ProbeConfig(interval=60))
        lst = Listener(lc, [bind(Endpoint("127.0.0.1", port))], "mx.test")
        lst.gate.set_healthy(True)  # open, although no probe ever succeeded
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(5):
            reply = await reader.readline()
            assert await reader.read() == b""  # then a clean close
        writer.close()
        assert lst.metrics.outcome["no_backend_421"].value == 1
        await lst.stop(1)
        return reply

    reply = asyncio.run(main())
    assert reply == b"421 4.3.2 mx.test Service not available, closing transmission channel\r\n"
