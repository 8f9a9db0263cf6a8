"""exec: run a command of the operator's; exit status 0 is up.

For what no protocol check can see (a queue length, a disk, a Nagios plugin).  The command
is an argv, never a shell line, run as the forwarder's own user (privileges are dropped
by then), with stdin from /dev/null, cwd "/", and a minimal environment: a fixed PATH and
FORWARDER_BACKEND_HOST, FORWARDER_BACKEND_PORT, FORWARDER_BACKEND (host:port, IPv6
bracketed) and FORWARDER_CHECK (the check's label).  stdout and stderr share one pipe; the
first OUTPUT_CAP bytes go into the detail and the rest is read and thrown away, so a
chatty command never blocks on a full pipe.  The verdict comes when the command exits,
not when the pipe closes: whatever it left behind holding the pipe is killed then.

No zombies, no orphans (HAProxy's external-check left both, bug #140): the command runs in
a session and process group of its own (start_new_session), and when it exits, or when the
timeout cancels the check, the whole group gets SIGKILL (whatever it left running in the
background dies with it) and is reaped before the check returns.  Reaping the group's
members needs them to be our children once their parent is gone, so the first exec check
makes this process a child subreaper (PR_SET_CHILD_SUBREAPER); otherwise they would go to
PID 1, and a container's PID 1 often never reaps (this sandbox's does not).  Only members
of a check's own process group are ever waited for, so children that the event loop
watches are left to it.  A command that escapes the group on purpose (setsid, a daemon) is
not followed.

A command that cannot be started (missing, not executable, a bad #! line) is a failure
that says so, never an exception (keepalived's bug #2126).  Children are watched by the
running loop's own mechanism: uvloop's libuv handles SIGCHLD itself, the default loop uses
its child watcher; both are exercised by the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import io
import os
import signal
import time
from functools import cache

from ...config.model import CheckConfig, Endpoint
from .common import CheckFailed, Progress, Verdict, quote

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OUTPUT_CAP = 512
REAP_WAIT = 1.0  # seconds for SIGKILLed group members to die and be reaped
_PR_SET_CHILD_SUBREAPER = 36


@cache
def become_subreaper() -> bool:
    """Make orphaned descendants our children (Linux >= 3.4), once per process."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def environment(cfg: CheckConfig, target: Endpoint) -> dict[str, str]:
    return {
        "PATH": PATH,
        "FORWARDER_BACKEND_HOST": target.host,
        "FORWARDER_BACKEND_PORT": str(target.port),
        "FORWARDER_BACKEND": str(target),
        "FORWARDER_CHECK": cfg.label,
    }


async def check(cfg: CheckConfig, target: Endpoint, progress: Progress) -> Verdict:
    argv = cfg.command
    if not argv:
        raise CheckFailed("exec check without a command")
    become_subreaper()
    progress.step = f"{argv[0]} to exit"
    # Our own pipe rather than stdout=PIPE: asyncio's Process.wait() (3.11) returns only
    # once the pipes are closed too, which a background child holding stdout delays to
    # the timeout.  Both ends are non-inheritable; the child gets the write end as 1 and 2.
    read_fd, write_fd = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=write_fd, stderr=write_fd,
            env=environment(cfg, target), cwd="/", start_new_session=True)
    except BaseException as e:
        os.close(read_fd)
        if isinstance(e, OSError):
            raise CheckFailed(_cannot_run(argv[0], e)) from None
        raise
    finally:
        os.close(write_fd)
    return await _watch(proc, read_fd, argv[0], progress)


async def _watch(proc: asyncio.subprocess.Process, read_fd: int, name: str,
                 progress: Progress) -> Verdict:
    """Wait for the exit, collecting the output; kill and reap the group in any case.
    The read end of the pipe is handed to a transport, which closes it: closing it here
    too would, on uvloop, close some later file that got the same number."""
    loop = asyncio.get_running_loop()
    output = _Output()
    transport: asyncio.BaseTransport | None = None
    reader: asyncio.Future[None] | None = None
    code: int | None = None
    try:
        stream = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stream), io.FileIO(read_fd, "rb"))
        reader = asyncio.ensure_future(output.collect(stream))
        code = await proc.wait()
    finally:
        # exited or cancelled by the deadline: nothing of the group may outlive the check
        _kill_group(proc.pid)
        await _reap(proc)
        try:
            if code is not None and reader is not None:
                # the group is dead, the pipe's last writer gone: the rest is buffered
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reader, REAP_WAIT)
        finally:
            if reader is not None:
                reader.cancel()
            if transport is not None:
                transport.close()
            if code is None:
                shown = output.shown()
                progress.step = (f"{name} to exit (killed with its process group"
                                 + (f"; it said {shown})" if shown else ")"))
    shown = output.shown()
    said = f": {shown}" if shown else ""
    if code == 0:
        return Verdict(True, f"exit 0{said}")
    if code < 0:
        try:
            signame = signal.Signals(-code).name
        except ValueError:
            signame = f"signal {-code}"
        return Verdict(False, f"{name} killed by {signame}{said}")
    return Verdict(False, f"exit {code}{said}")


class _Output:
    """The first OUTPUT_CAP bytes of stdout+stderr, and how many there were in all."""

    def __init__(self) -> None:
        self.head = bytearray()
        self.total = 0

    async def collect(self, stream: asyncio.StreamReader) -> None:
        """Read until EOF, keeping the head and dropping the rest."""
        while chunk := await stream.read(65536):
            self.total += len(chunk)
            if len(self.head) < OUTPUT_CAP:
                self.head += chunk[:OUTPUT_CAP - len(self.head)]

    def shown(self) -> str:
        text = bytes(self.head).strip()
        if not text:
            return ""
        more = self.total - len(self.head)
        return quote(text, OUTPUT_CAP) + (f"... ({more} more bytes)" if more else "")


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Wait for the leader (the loop's watcher reaps it), then for the members of its
    group that became our children.  Bounded: a member stuck in the kernel (D state)
    is left after REAP_WAIT rather than holding the prober."""
    deadline = time.monotonic() + REAP_WAIT
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), REAP_WAIT)
    if proc.returncode is None:
        return  # never wait on the group while the loop may still reap the leader
    while True:
        try:
            pid, _ = os.waitpid(-proc.pid, os.WNOHANG)  # noqa: ASYNC222 (never blocks)
        except ChildProcessError:
            return  # none of the group is our child any more
        if pid == 0:  # members left, still dying
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(0.005)


def _cannot_run(path: str, e: OSError) -> str:
    if e.errno == errno.ENOENT:
        if os.path.exists(path):
            return f"cannot run {path}: its interpreter (the #! line) was not found"
        where = "" if "/" in path else f" in PATH {PATH}"
        return f"cannot run {path}: no such file{where}"
    if e.errno == errno.EACCES:
        if os.path.isdir(path):
            return f"cannot run {path}: it is a directory"
        return f"cannot run {path}: permission denied (not executable by this user?)"
    if e.errno == errno.ENOEXEC:
        return f"cannot run {path}: not an executable format (a script without #!?)"
    why = e.strerror or type(e).__name__
    return f"cannot run {path}: {why[:1].lower()}{why[1:]}"
