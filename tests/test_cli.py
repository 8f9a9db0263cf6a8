"""What a new user and an attacker found at the command line (issue 11), each through the
real `forwarder` process: conflicts at start, options over xinetd files, exit codes,
`status --config`, convert-xinetd's output, peers in logs."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .conftest import need_root
from .helpers import (
    Forwarder,
    HungBackend,
    SmtpBackend,
    forwarder,
    free_port,
    run_cli,
    smtp_reply,
    toml_listener,
    wait_port,
)


def get_status(admin: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=5) as r:
        return dict(json.load(r))


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def test_second_forwarder_on_the_same_address_exits_3(tmp_path: Path) -> None:
    """Bug 1: the second one used to start, take the port from the first's closed gate
    and leave it closed for good.  Now the closed gate keeps its port to itself."""
    port, dead = free_port(), free_port()
    cfg = toml_listener(port, dead)
    with forwarder(cfg) as fw:
        fw.wait_event("probe.failed")  # running, gate closed (the backend is down)
        f = tmp_path / "same.toml"
        f.write_text(cfg)
        r = run_cli("run", str(f), timeout=20)
        assert r.returncode == 3, r.stderr
        assert r.stderr.strip().splitlines() == [
            f"forwarder: cannot bind 127.0.0.1:{port}: Address already in use (another "
            "process has it bound; a forwarder whose gate is closed holds its port without "
            "listening, so `ss -ltnp` may not show it)"]
        # nor can an xinetd-style SO_REUSEADDR bind take it
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with pytest.raises(OSError, match="Address already in use"):
            s.bind(("127.0.0.1", port))
        s.close()
        assert fw.proc is not None and fw.proc.poll() is None


def test_busy_admin_port_is_one_line_and_exit_3() -> None:
    """Bug 5: a 30-line traceback and exit 1 before."""
    port, be = free_port(), free_port()
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    admin = holder.getsockname()[1]
    r = run_cli("--listen", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{be}",
                "--admin", f"127.0.0.1:{admin}", timeout=20)
    holder.close()
    assert r.returncode == 3
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"forwarder: cannot bind 127.0.0.1:{admin}: Address already in use"), r.stderr
    assert "Traceback" not in r.stderr


def xinetd_service(tmp_path: Path, port: int, backend: int, user: str = "root") -> Path:
    f = tmp_path / "svc"
    f.write_text(f"""service fwtest
{{
    type = UNLISTED
    socket_type = stream
    protocol = tcp
    wait = no
    user = {user}
    bind = 127.0.0.1
    port = {port}
    redirect = 127.0.0.1 {backend}
}}
""")
    f.chmod(0o644)
    return f


@pytest.mark.parametrize("user", [None, "daemon", "root"])
def test_xinetd_file_with_command_line_options_on_top(tmp_path: Path, user: str | None) -> None:
    """Bug 2: --admin, --user and --log-* were ignored with --xinetd, and a file's
    `user = root` kept root.  Root stays only when --user root says so."""
    need_root()
    port, admin = free_port(), free_port()
    with SmtpBackend() as be:
        svc = xinetd_service(tmp_path, port, be.port)
        args = ["--xinetd", str(svc), "--admin", f"127.0.0.1:{admin}"]
        if user:
            args += ["--user", user]
        with Forwarder(args=args) as fw:
            fw.wait_event("admin.listening")
            st = get_status(admin)
            assert st["listeners"][0]["addresses"] == [f"127.0.0.1:{port}"]
            want = {"root": 0, "daemon": 1, None: 65534}[user]
            assert uid_of(st["pid"]) == want
            # --log-level debug (added by the Forwarder helper) is in effect
            fw.wait_event("rlimit.nofile")
            wait_port("127.0.0.1", port, "open", 10)


def test_xinetd_refuses_listen_and_backend_flags(tmp_path: Path) -> None:
    svc = xinetd_service(tmp_path, free_port(), free_port())
    r = run_cli("--xinetd", str(svc), "--listen", "127.0.0.1:1", "--backend", "127.0.0.1:2")
    assert r.returncode == 2 and "--xinetd: --xinetd takes the listen address" in r.stderr


def test_status_finds_the_admin_address_in_the_config(tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    with SmtpBackend() as be:
        cfg = toml_listener(port, be.port, top=f'admin = "127.0.0.1:{admin}"')
        with forwarder(cfg) as fw:
            fw.wait_event("gate.open")
            r = run_cli("status", "--config", str(fw.config_path))
            assert r.returncode == 0, r.stderr
            assert r.stdout.startswith(f"smtp 127.0.0.1:{port}: gate open (probe)"), r.stdout
            assert f"UP   127.0.0.1:{be.port}" in r.stdout


def test_convert_xinetd_output_says_what_differs_and_reads_back(tmp_path: Path) -> None:
    f = tmp_path / "smtp"
    f.write_text("service smtp\n{\n  socket_type = stream\n  protocol = tcp\n  wait = no\n"
                 "  user = nobody\n  bind = 127.0.0.1\n  redirect = 127.0.0.1 8025\n"
                 "  cps = 50 10\n}\n")
    r = run_cli("convert-xinetd", str(f))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "cps = [50, 10]\n" in out
    assert "nodelay = false  # xinetd's default (no flags = NODELAY); the forwarder's own " \
           "default is true\n" in out
    assert '# admin = "127.0.0.1:9125"' in out
    toml = tmp_path / "smtp.toml"
    toml.write_text(out)
    back = run_cli("check-config", str(toml))
    assert back.returncode == 0, back.stderr
    assert "cps = [50, 10]" in back.stdout and "nodelay = false" in back.stdout


def test_no_backend_log_names_the_peer_with_its_port_and_v6_in_brackets() -> None:
    """And the 421 names this host, not "localhost" (getfqdn's fallback)."""
    port = free_port("::1")
    with HungBackend() as be:
        cfg = toml_listener(port, be.port, probe="tcp", address="::1",
                            extra="greeting_timeout = 0.3\n")
        with forwarder(cfg) as fw:
            wait_port("::1", port, "open", 10)
            c = socket.create_connection(("::1", port), timeout=5)
            cport = c.getsockname()[1]
            reply = smtp_reply(c).decode()
            c.close()
            ev = fw.wait_event("connection.no_backend")
            assert ev["peer"] == f"[::1]:{cport}"
            assert reply.startswith("421 4.3.2 ")
            if socket.gethostname() != "localhost":
                assert "localhost" not in reply.split()[2], reply


def test_help_and_version_exit_0() -> None:
    for args in (["--help"], ["--version"], ["run", "--help"], ["status", "--help"]):
        r = run_cli(*args)
        assert r.returncode == 0, (args, r.stderr)


def test_check_config_prints_warnings_on_stderr_and_the_toml_on_stdout(tmp_path: Path) -> None:
    f = tmp_path / "w.toml"
    f.write_text(toml_listener(free_port(), 8025, interval=0.2, probe_timeout=1.0))
    r = run_cli("check-config", str(f))
    assert r.returncode == 0
    assert "forwarder: warning:" in r.stderr and "probe.timeout" in r.stderr
    assert "[[listener]]" in r.stdout and "warning" not in r.stdout
