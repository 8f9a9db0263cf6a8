"""As root: bind a privileged port, drop to nobody, and still toggle the gate."""

from __future__ import annotations

import pwd
import socket
from pathlib import Path

from .conftest import need_root
from .helpers import SmtpBackend, connect_result, forwarder, free_port, toml_listener, wait_port


def _free_privileged_port(host: str) -> int:
    for port in range(700, 1000):
        with socket.socket() as s:
            try:
                s.bind((host, port))
                return port
            except OSError:
                continue
    raise AssertionError("no free port below 1024")


def _ids(pid: int) -> dict[str, list[int]]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("Uid", "Gid", "Groups"):
            out[k] = [int(x) for x in v.split()]
        if k == "CapEff":
            out[k] = [int(v.strip(), 16)]
    return out


def test_privileged_port_drop_to_nobody_and_toggle() -> None:
    need_root()
    host = "127.0.0.1"
    port = _free_privileged_port(host)
    bport = free_port()
    nobody = pwd.getpwnam("nobody")
    with forwarder(toml_listener(port, bport, interval=0.1, rise=1, fall=1)) as fw:
        ids = _ids(fw.pid)
        assert ids["Uid"] == [nobody.pw_uid] * 4
        assert ids["Gid"] == [nobody.pw_gid] * 4
        assert ids["Groups"] == []
        assert ids["CapEff"] == [0]
        for _ in range(3):
            assert connect_result(host, port) == "refused"
            with SmtpBackend(bport):
                wait_port(host, port, "open", 5)
            wait_port(host, port, "refused", 5)
        assert _ids(fw.pid)["Uid"][0] == nobody.pw_uid
        fw.read_events()
        assert sum(1 for e in fw.events if e["event"] == "gate.open") == 3


def test_after_the_drop_a_new_privileged_bind_fails() -> None:
    """SIGHUP with a new listener on a port < 1024: the dropped process cannot bind it,
    says so, and keeps serving the old one."""
    need_root()
    import signal

    host = "127.0.0.1"
    port, bport = free_port(), free_port()
    new_port = _free_privileged_port(host)
    cfg = toml_listener(port, bport, interval=0.1, rise=1, fall=1)
    with SmtpBackend(bport), forwarder(cfg) as fw:
        wait_port(host, port, "open", 5)
        extra = toml_listener(new_port, bport, name="second").split("drain_timeout = 5", 1)[1]
        fw.config_path.write_text(cfg + extra)
        mark = fw.mark()
        fw.signal(signal.SIGHUP)
        ev = fw.wait_event("reload.needs_restart", since=mark, listener="second")
        assert "Permission denied" in ev["error"]
        assert connect_result(host, new_port) == "refused"
        assert connect_result(host, port) == "open"
