"""The gate follows the backend: refused while down, open while up, quickly."""

from __future__ import annotations

import socket

from .helpers import (
    SmtpBackend,
    connect_result,
    forwarder,
    free_port,
    smtp_reply,
    toml_listener,
    wait_port,
)


def test_refuses_until_backend_up_then_refuses_again() -> None:
    port, bport = free_port(), free_port()
    interval = 0.2
    with forwarder(toml_listener(port, bport, interval=interval, rise=2, fall=2)) as fw:
        assert connect_result("127.0.0.1", port) == "refused"
        with SmtpBackend(bport):
            t = wait_port("127.0.0.1", port, "open", timeout=5)
            assert t < 2 * interval + 0.5
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                assert smtp_reply(s).startswith(b"220 ")
        mark = fw.mark()
        t = wait_port("127.0.0.1", port, "refused", timeout=5)
        assert t < 2 * interval + 0.5
        fw.wait_event("gate.closed", since=mark, reason="probe")
