"""The fork server: worker processes are forked from a process that never ran an event loop.

Why: a worker that dies must be replaced while the master's loop runs, and forking a
process with a running uvloop gives a child that inherits the loop's epoll set and
callbacks (neither asyncio nor uvloop support it).  Exec'ing a fresh interpreter is no way
out either: after the privilege drop the Python installation may not be readable (a pyenv
under /root).  So right after the privilege drop, before any loop exists, the master forks
this small server; it waits for "spawn" messages (each with the new worker's end of a
socketpair) and forks the worker from its own clean state, reaps its children and reports
their exits.  The fork server and its workers die with their parent (PR_SET_PDEATHSIG), so
no worker outlives a master that was killed outright.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import sys
from collections.abc import Callable

from ..net import ipc

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class Zygote:
    """The master's handle on the fork server (`spawn` is used from the event loop through
    the channel in workers/hub.py; this class only starts and stops the process)."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock

    @classmethod
    def fork(cls, worker_main: Callable[[int, int], int]) -> Zygote:
        """Fork the server; `worker_main(fd, index)` is what a spawned worker runs."""
        ours, theirs = ipc.pair()
        pid = os.fork()
        if pid == 0:  # the fork server
            ours.close()
            code = 1
            try:
                code = _serve(theirs, worker_main)
            finally:
                os._exit(code)
        theirs.close()
        return cls(pid, ours)

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _serve(sock: socket.socket, worker_main: Callable[[int, int], int]) -> int:
    die_with_parent()
    # nothing the master holds stays open here (a listening or admin socket kept by this
    # process would keep its port bound and queueing): workers get their sockets by message
    keep = sock.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the master decides when we stop
    children: dict[int, int] = {}  # pid -> worker index
    while True:
        ready, _, _ = select.select([sock], [], [], 0.2)
        while True:  # reap
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            index = children.pop(pid, -1)
            ipc.send_blocking(sock, "exited", (index, pid, os.waitstatus_to_exitcode(status)))
        if not ready:
            continue
        try:
            msg = ipc.recv_blocking(sock)
        except OSError:
            return 0
        if msg is None:  # the master is gone
            return 0
        kind, payload, fds = msg
        if kind != "spawn" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            continue
        index = int(payload)
        pid = os.fork()
        if pid == 0:  # the worker
            sock.close()
            code = 1
            try:
                code = worker_main(fds[0], index)
            except BaseException:
                import traceback
                traceback.print_exc(file=sys.stderr)
            finally:
                os._exit(code)
        os.close(fds[0])
        children[pid] = index
        ipc.send_blocking(sock, "spawned", (index, pid))
