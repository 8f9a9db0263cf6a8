"""Deployment: the systemd units verify, and the three privilege models work for real:
socket activation (systemd-socket-activate, and fds passed the way systemd passes them),
CAP_NET_BIND_SERVICE as nobody, sd_notify, and a restart that refuses no SYN."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from .conftest import need_root, need_tool
from .helpers import (
    ROOT,
    EchoBackend,
    Forwarder,
    SmtpBackend,
    connect_result,
    forwarder_cmd,
    free_port,
    wait_port,
    wait_until,
)
from .test_gate_root import _free_privileged_port, _ids

if TYPE_CHECKING:
    from .installed import Installed

UNITS = ROOT / "deploy" / "systemd"


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = need_tool("systemd-analyze")
    exe = forwarder_cmd()[0]
    units = sorted(UNITS.glob("*.s*"))
    assert {u.name for u in units} >= {"forwarder.service", "forwarder.socket"}
    for u in units:  # verify checks ExecStart exists: point it at this checkout's binary
        (tmp_path / u.name).write_text(
            u.read_text().replace("/opt/forwarder/venv/bin/forwarder", exe))
    r = subprocess.run([analyze, "verify", "--man=no", *(str(tmp_path / u.name) for u in units)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    service = (UNITS / "forwarder.service").read_text()
    for line in ("Type=notify", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "CapabilityBoundingSet=\n", "SystemCallFilter=@system-service",
                 "DynamicUser=yes", "PrivateTmp=yes", "PrivateDevices=yes", "ProtectHome=yes",
                 "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX"):
        assert line in service, line


def test_systemd_socket_activate_passes_the_socket_and_the_gate_toggles(tmp_path: Path) -> None:
    activate = need_tool("systemd-socket-activate")
    strace = shutil.which("strace")
    port, bport = free_port(), free_port()
    trace = tmp_path / "trace"
    prefix = [strace, "-f", "-e", "trace=bind,execve", "-o", str(trace)] if strace else []
    cmd = [*prefix, activate, "-l", f"127.0.0.1:{port}", *forwarder_cmd(),
           "--backend", f"127.0.0.1:{bport}", "--probe", "tcp", "--interval", "0.1",
           "--log-format", "json", "--log-level", "debug"]
    fw = Forwarder()
    fw.cmd = cmd  # activation spawns the forwarder only on the first connection
    fw._log = open(fw.log_path, "wb")  # noqa: SIM115
    fw.proc = subprocess.Popen(cmd, stdout=fw._log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: connect_result("127.0.0.1", port) != "refused", 10,
                   "systemd-socket-activate listening")  # this connect triggers the spawn
        fw.wait_event("forwarder.started", timeout=15)
        # backend down: the gate closes on the passed socket
        fw.wait_event("gate.closed", timeout=10)
        assert connect_result("127.0.0.1", port) == "refused"
        with EchoBackend(bport):
            wait_port("127.0.0.1", port, "open", 10)
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"through the activated socket")
                assert s.recv(100) == b"through the activated socket"
        wait_port("127.0.0.1", port, "refused", 10)
        with EchoBackend(bport):
            wait_port("127.0.0.1", port, "open", 10)
        fw.read_events()
        assert any(e["event"] == "activation.socket" for e in fw.events)
    finally:
        # under strace the forwarder is strace's child (socket-activate execs it): stopping
        # strace alone would detach and leave it running
        assert fw.proc is not None
        kids = [int(p) for p in _children(fw.proc.pid)] if strace else []
        for pid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        fw.stop()
        for pid in kids:
            wait_until(partial(_gone, pid), 15, f"forwarder {pid} gone")
    if strace:
        lines = trace.read_text().splitlines()
        exec_at = next(i for i, line in enumerate(lines) if "execve(" in line
                       and "forwarder" in line and "socket-activate" not in line)
        binds = [line for line in lines[exec_at:] if "bind(" in line and f"htons({port})" in line]
        assert not binds, binds  # the forwarder never bound the port itself


def _children(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []


def _gone(pid: int) -> bool:
    """Exited (a zombie counts: whoever inherits it reaps it, or nobody does here)."""
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


def _launch_with_fd(sock: socket.socket, args: list[str], log: Path,
                    env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start the forwarder the way systemd does: the socket as fd 3, LISTEN_FDS=1 and
    LISTEN_PID = the forwarder's own pid (bash execs, keeping its pid; dash cannot
    redirect from an fd above 9)."""
    fd = sock.fileno()
    cmd = " ".join(forwarder_cmd() + args)
    script = f'exec 3<&{fd}; LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=smtp exec {cmd}'
    with open(log, "ab") as out:
        return subprocess.Popen(["bash", "-c", script], pass_fds=(fd,),
                                env={**os.environ, **(env or {})},
                                stdout=out, stderr=subprocess.STDOUT)


def test_restart_with_a_passed_socket_refuses_no_syn(tmp_path: Path) -> None:
    """The socket stays with its owner (systemd; here the test): between two forwarder
    instances it is back in LISTEN, so a client connecting then is queued and served by
    the next instance, not refused."""
    port, bport = free_port(), free_port()
    owner = socket.socket()
    owner.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    owner.bind(("127.0.0.1", port))
    owner.listen(64)
    args = ["--backend", f"127.0.0.1:{bport}", "--probe", "tcp", "--interval", "0.1",
            "--log-format", "json"]
    log = tmp_path / "log"
    with EchoBackend(bport):
        first = _launch_with_fd(owner, args, log)
        try:
            wait_until(lambda: "gate.open" in log.read_text(), 15,
                       f"first instance open: {log.read_text()[-2000:]}")
            assert connect_result("127.0.0.1", port) == "open"
            first.send_signal(signal.SIGTERM)
            assert first.wait(15) == 0
        finally:
            if first.poll() is None:
                first.kill()
        # between instances: queued, not refused
        waiting = socket.create_connection(("127.0.0.1", port), timeout=5)
        waiting.sendall(b"sent while no forwarder ran")
        second = _launch_with_fd(owner, args, log)
        try:
            waiting.settimeout(15)
            assert waiting.recv(100) == b"sent while no forwarder ran"
            waiting.close()
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(15)
    owner.close()


def test_sd_notify_ready_reloading_stopping(tmp_path: Path) -> None:
    port, bport = free_port(), free_port()
    notify_dir = Path(tempfile.mkdtemp(prefix="fwnotify-"))
    os.chmod(notify_dir, 0o755)  # the forwarder sends after dropping to nobody
    path = notify_dir / "notify"
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(str(path))
    os.chmod(path, 0o777)
    ns.settimeout(10)
    cfg = f"""
[[listener]]
name = "n"
address = "127.0.0.1"
port = {port}
mode = "tcp"
backend = "127.0.0.1:{bport}"
"""
    with SmtpBackend(bport):
        fw = Forwarder(cfg, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000",
                                 "WATCHDOG_PID": ""})
        with fw:
            got = ns.recv(4096).decode()
            assert "READY=1" in got
            assert ns.recv(4096) == b"WATCHDOG=1"
            fw.signal(signal.SIGHUP)
            seen = []
            while "READY=1" not in seen:
                m = ns.recv(4096).decode()
                if m != "WATCHDOG=1":
                    seen.append(m)
            assert seen[0].startswith("RELOADING=1")
            fw.signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if ns.recv(4096).decode().startswith("STOPPING=1"):
                    break
            else:
                raise AssertionError("no STOPPING=1")
    ns.close()
    shutil.rmtree(notify_dir, ignore_errors=True)


def test_cap_net_bind_service_as_nobody(installed_forwarder: Installed) -> None:
    """Started as nobody with only CAP_NET_BIND_SERVICE (what forwarder-capability.service
    gives it): binds a port < 1024 and toggles it.  It runs the copy installed where nobody
    can read it (tests/installed.py), not this checkout, which may sit under a 0700
    directory, as an install in root's home would."""
    need_root()
    setpriv = need_tool("setpriv")
    port = _free_privileged_port("127.0.0.1")
    bport = free_port()
    prefix = [setpriv, "--reuid=nobody", "--regid=nogroup", "--init-groups",
              "--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service"]
    fw = Forwarder()
    fw.cmd = [*prefix, *installed_forwarder.forwarder, "--listen", f"127.0.0.1:{port}",
              "--backend", f"127.0.0.1:{bport}", "--probe", "tcp", "--interval", "0.1",
              "--log-format", "json", "--log-level", "debug"]
    with fw:
        ids = _ids(fw.pid)
        assert ids["Uid"][0] == 65534
        cmdline = Path(f"/proc/{fw.pid}/cmdline").read_bytes().split(b"\0")
        assert installed_forwarder.forwarder[0].encode() in cmdline, cmdline
        for _ in range(2):
            assert connect_result("127.0.0.1", port) == "refused"
            with EchoBackend(bport):
                wait_port("127.0.0.1", port, "open", 10)
            wait_port("127.0.0.1", port, "refused", 10)
