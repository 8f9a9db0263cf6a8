"""SIGHUP applies what it can (admin address, log level and format) and names what needs a
restart (issue 11, bug 7); a second SIGTERM while draining forces the exit."""

from __future__ import annotations

import signal
import socket
import time

from .helpers import (
    EchoBackend,
    Forwarder,
    connect_result,
    free_port,
    toml_listener,
    wait_port,
)


def test_reload_moves_the_admin_endpoint() -> None:
    port, a1, a2, dead = free_port(), free_port(), free_port(), free_port()
    with Forwarder(toml_listener(port, dead, top=f'admin = "127.0.0.1:{a1}"')) as fw:
        fw.wait_event("admin.listening")
        assert connect_result("127.0.0.1", a1) == "open"
        fw.config_path.write_text(toml_listener(port, dead, top=f'admin = "127.0.0.1:{a2}"'))
        mark = fw.mark()
        fw.signal(signal.SIGHUP)
        fw.wait_event("reload.done", since=mark)
        moved = next(e for e in fw.events[mark:] if e["event"] == "reload.admin")
        assert moved["address"] == f"127.0.0.1:{a2}"
        wait_port("127.0.0.1", a2, "open", 5)
        assert connect_result("127.0.0.1", a1) == "refused"


def test_reload_applies_the_log_level_and_names_keys_that_need_a_restart() -> None:
    port, dead = free_port(), free_port()
    quiet = toml_listener(port, dead, top='log = { level = "info", format = "json" }',
                          interval=0.05)
    fw = Forwarder(quiet)
    fw.cmd = fw.cmd[:fw.cmd.index("--log-format")]  # the file decides the level here
    with fw:
        fw.wait_event("probe.failed")  # the first failure of a run: a warning
        assert not [e for e in fw.events if e.get("level") == "debug"]
        loud = toml_listener(port, dead, top='user = "daemon"\n'
                                             'log = { level = "debug", format = "json" }',
                             interval=0.05)
        fw.config_path.write_text(loud)
        mark = fw.mark()
        fw.signal(signal.SIGHUP)
        ev = fw.wait_event("reload.needs_restart", since=mark)
        assert ev["keys"] == ["user"]
        fw.wait_event("reload.done", since=mark)
        # the failures that follow are debug events: now they show
        fw.wait_event("probe.failed", since=mark, level="debug")


def test_second_sigterm_while_draining_cuts_and_exits_1() -> None:
    port = free_port()
    with EchoBackend() as be:
        cfg = toml_listener(port, be.port, mode="tcp", probe="tcp").replace(
            "drain_timeout = 5", "drain_timeout = 60")
        with Forwarder(cfg) as fw:
            wait_port("127.0.0.1", port, "open", 10)
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            c.sendall(b"x")
            assert c.recv(10) == b"x"  # a live splice, which would hold the drain 60 s
            mark = fw.mark()
            fw.signal(signal.SIGTERM)
            fw.wait_event("forwarder.stopping", since=mark)
            t0 = time.monotonic()
            fw.signal(signal.SIGTERM)
            assert fw.proc is not None
            assert fw.proc.wait(10) == 1
            assert time.monotonic() - t0 < 5
            fw.wait_event("forwarder.forced_exit", since=mark)
            assert fw.wait_event("forwarder.stopped", since=mark)["cut"] == 1
            try:
                assert c.recv(10) == b""
            except ConnectionResetError:
                pass  # the cut is a reset: what a cut-off client should see
            c.close()
