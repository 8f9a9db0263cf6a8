"""Shared test parts: real processes and real sockets on loopback, every wait bounded.

- `Forwarder`: the real `forwarder` CLI in a subprocess, JSON logs read back as events.
- `SmtpBackend`: a real aiosmtpd server in a thread, recording what it receives.
- `HungBackend`: accepts TCP and never says a word (a stuck JVM).
- `EchoBackend`: echoes, or answers a half-closed stream with a digest (integrity tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0


_next_port = itertools.count(20000 + os.getpid() % 6000)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now and stays free until the test binds it: taken below the
    kernel's ephemeral range (32768-60999), so no bind(0) or outgoing connect of this
    process (an SmtpBackend, a client) can take it in between, and never handed out twice
    in one session.  (bind(0) here once returned a port a backend started next then took.)"""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(12000):
        port = 20000 + (next(_next_port) - 20000) % 12000
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-31999")


def connect_result(host: str, port: int, timeout: float = 1.0) -> str:
    """'open', 'refused' or 'timeout' for one TCP connect."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((host, port))
            return "open"
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "timeout"


def wait_until(pred: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.01) -> float:
    """Poll an observable condition (a port state, a file) until true; return seconds taken.

    Used only where no event can be awaited (the kernel's view of a port).
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        if pred():
            return time.monotonic() - t0
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    """wait_until for a test's own event loop: poll state the code under test keeps (a
    counter, a flag) where it offers no event to await; bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():  # polling the state under test: it offers no event
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


def wait_port(host: str, port: int, state: str, timeout: float) -> float:
    return wait_until(lambda: connect_result(host, port, 0.5) == state, timeout,
                      f"{host}:{port} to be {state}")


def smtp_reply(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Read one full (possibly multi-line) SMTP reply."""
    sock.settimeout(timeout)
    buf = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return buf
        buf += chunk
        lines = buf.split(b"\r\n")
        for line in lines[:-1]:
            if len(line) >= 4 and line[3:4] == b" ":
                return buf


def forwarder_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "forwarder"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "forwarder"]


class Forwarder:
    """The real forwarder in a subprocess.  Use as a context manager: always stopped."""

    def __init__(self, config: str | None = None, args: list[str] | None = None,
                 env: dict[str, str] | None = None, prefix: list[str] | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fwtest-"))
        os.chmod(self.dir, 0o755)  # readable after the drop to nobody (reload tests)
        self.config_path = self.dir / "forwarder.toml"
        if config is not None:
            self.config_path.write_text(config)
            os.chmod(self.config_path, 0o644)
            cmd = [*forwarder_cmd(), "run", "--config", str(self.config_path)]
        else:
            cmd = forwarder_cmd()
        # FWTEST_WORKERS=N runs every forwarder of the suite with N worker processes
        workers = (["--workers", os.environ["FWTEST_WORKERS"]]
                   if os.environ.get("FWTEST_WORKERS") else [])
        self.cmd = [*(prefix or []), *cmd, *(args or []), *workers, "--log-format", "json",
                    "--log-level", "debug"]
        self.env = {**os.environ, **(env or {})}
        self.log_path = self.dir / "log.jsonl"
        self.proc: subprocess.Popen[bytes] | None = None
        self._pos = 0
        self.events: list[dict[str, Any]] = []

    def start(self) -> Forwarder:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=ROOT)
        self.wait_event("forwarder.started", timeout=15)
        return self

    def __enter__(self) -> Forwarder:
        try:
            return self.start()
        except BaseException:
            self.stop()  # a forwarder that never got ready must not outlive its test
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def read_events(self) -> list[dict[str, Any]]:
        """New JSON log events since the last call (also kept in self.events)."""
        with open(self.log_path, "rb") as f:
            f.seek(self._pos)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._pos += end
        new = []
        for line in data[:end].splitlines():
            try:
                new.append(json.loads(line))
            except ValueError:
                new.append({"event": "_raw", "line": line.decode("utf-8", "replace")})
        self.events.extend(new)
        return new

    def wait_event(self, event: str, timeout: float = 10.0, since: int = 0,
                   **match: Any) -> dict[str, Any]:
        """Wait for a log event (with matching fields) at index >= since in self.events."""
        deadline = time.monotonic() + timeout
        while True:
            self.read_events()
            for ev in self.events[since:]:
                if ev.get("event") == event and all(ev.get(k) == v for k, v in match.items()):
                    return ev
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"forwarder exited ({self.proc.returncode}) before "
                                     f"{event}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {event} {match} within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.01)

    def mark(self) -> int:
        """Index into self.events to wait for events after this point."""
        self.read_events()
        return len(self.events)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        rc = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait(5)
        elif self.proc is not None:
            rc = self.proc.returncode
        if hasattr(self, "_log"):
            self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        return rc


def run_cli(*args: str, timeout: float = 30.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*forwarder_cmd(), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, input=input)


# --------------------------------------------------------------------------------------
# backends


class SmtpBackend:
    """A real aiosmtpd server on loopback, in its own thread; records each message."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1",
                 proxy_protocol: bool = False) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.proxy_protocol = proxy_protocol
        self.messages: list[dict[str, Any]] = []
        self._received = threading.Condition()
        self.controller: Any = None

    def start(self) -> SmtpBackend:
        from aiosmtpd.controller import Controller

        outer = self

        class Handler:
            async def handle_PROXY(self, server: Any, session: Any, envelope: Any,
                                   proxy_data: Any) -> bool:
                return True  # aiosmtpd rejects every PROXY session without this hook

            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                with outer._received:
                    outer.messages.append({
                        "from": envelope.mail_from, "to": list(envelope.rcpt_tos),
                        "data": envelope.original_content or envelope.content,
                        "peer": session.peer,
                        "proxy": getattr(session, "proxy_data", None),
                    })
                    outer._received.notify_all()
                return "250 OK"

        kwargs: dict[str, Any] = {}
        if self.proxy_protocol:
            kwargs["proxy_protocol_timeout"] = 5
        self.controller = Controller(Handler(), hostname=self.host, port=self.port,
                                     ready_timeout=10, **kwargs)
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def __enter__(self) -> SmtpBackend:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_messages(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        with self._received:
            ok = self._received.wait_for(lambda: len(self.messages) >= n, timeout)
        assert ok, f"expected {n} messages, got {len(self.messages)}"
        return self.messages


class _ThreadServer:
    """A listening socket served by a thread; subclasses define handle(conn)."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port(host)
        self.sock: socket.socket | None = None
        self.conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self.accepted = 0

    def start(self) -> Any:
        s = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(1024)
        s.settimeout(0.1)
        self.sock = s
        t = threading.Thread(target=self._accept_loop, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def _accept_loop(self) -> None:
        assert self.sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            self.conns.append(conn)
            t = threading.Thread(target=self._handle_safe, args=(conn,), daemon=True)
            t.start()

    def _handle_safe(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.handle(conn)

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._stop.set()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.close()
        for t in self._threads:
            t.join(2)

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class HungBackend(_ThreadServer):
    """Completes the TCP handshake, then never sends a byte."""

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        while not self._stop.is_set():
            try:
                if not conn.recv(65536):
                    return
            except TimeoutError:
                continue


class EchoBackend(_ThreadServer):
    """Echo mode: every byte back.  Digest mode: read to EOF, reply with the sha256 of what
    arrived followed by `reply_size` pseudo-random bytes (a half-close test)."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", *,
                 greeting: bytes = b"", digest_reply: int | None = None) -> None:
        super().__init__(port, host)
        self.greeting = greeting
        self.digest_reply = digest_reply

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(60)
        if self.greeting:
            conn.sendall(self.greeting)
        if self.digest_reply is None:
            while data := conn.recv(262144):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            return
        h = hashlib.sha256()
        while data := conn.recv(262144):
            h.update(data)
        conn.sendall(h.hexdigest().encode() + b"\n")
        conn.sendall(pattern(self.digest_reply))
        conn.shutdown(socket.SHUT_WR)


def pattern(n: int, seed: int = 1) -> bytes:
    """n deterministic pseudo-random bytes (fast: a repeated random block)."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    reps = n // len(block) + 1
    return (block * reps)[:n]


def is_refused(err: OSError) -> bool:
    return err.errno == errno.ECONNREFUSED


def toml_listener(port: int, backend_port: int, *, mode: str = "smtp", probe: str = "smtp",
                  interval: float = 0.2, rise: int = 1, fall: int = 1, extra: str = "",
                  probe_extra: str = "", top: str = "", name: str = "smtp",
                  address: str = "127.0.0.1", probe_timeout: float = 1.0) -> str:
    """A one-listener TOML config with fast probes, for tests."""
    return f"""
{top}
drain_timeout = 5
[[listener]]
name = "{name}"
address = "{address}"
port = {port}
mode = "{mode}"
backend = "127.0.0.1:{backend_port}"
{extra}
[listener.probe]
kind = "{probe}"
interval = {interval}
fast_interval = 0.05
timeout = {probe_timeout}
rise = {rise}
fall = {fall}
jitter = 0.0
{probe_extra}
"""


@contextlib.contextmanager
def forwarder(config: str, **kw: Any) -> Iterator[Forwarder]:
    f = Forwarder(config, **kw)
    try:
        yield f.start()
    finally:
        f.stop()
