"""The relay: socket -> pipe -> socket with os.splice(), per direction, the product's one
data path.

The bytes never enter Python: each readiness callback moves up to CHUNK bytes through a
kernel pipe.  Small exchanges (a greeting, an SMTP command) are copied with recv/send
instead, because a pipe pair costs eight syscalls to set up and tear down, more than a
short session moves; the first full read or blocked send switches a direction to a pipe.
Without os.splice (not Linux) or without a free fd for a pipe, a direction keeps copying:
slower, same contract.  (The first build also had an asyncio Protocol relay; on every
workload of the benchmark the splice path matched or beat it at half the CPU per GB and
1.5x the sessions per second, so it was removed: README, "Benchmark".)

Readiness comes from the Poller (poller.py: uvloop drops readers on EPOLLERR).

The contract: half-close per direction (an EOF is passed on as shutdown(SHUT_WR) once the
direction is drained, the other direction keeps flowing); flow control (a direction stops
reading while its destination cannot take more); every byte read is delivered or the
other side is reset, never a FIN after a loss; `on_done(splice, outcome)` exactly once.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Callable
from typing import Any

from ..net.sockets import reset
from .poller import Poller

CHUNK = 1 << 20
COPY_MAX = 16384
PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
HAVE_SPLICE = hasattr(os, "splice")
_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if HAVE_SPLICE else 0
_AGAIN = (BlockingIOError, InterruptedError)


class _Direction:
    __slots__ = ("dst", "dst_fd", "eof", "held", "nbytes", "owner", "peer", "pipe_r",
                 "pipe_w", "poller", "queued", "reading", "shut", "src", "src_fd", "writing")

    def __init__(self, owner: Splice, src: socket.socket, dst: socket.socket) -> None:
        self.owner = owner
        self.peer: _Direction = self  # the other direction, set by Splice
        self.poller = owner.poller
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.pipe_r = self.pipe_w = -1  # created on the first large read (see _on_readable)
        self.queued = 0  # bytes sitting in the pipe
        self.held: memoryview | None = None  # a copy-mode remainder when no pipe could be had
        self.nbytes = 0
        self.eof = False
        self.shut = False
        self.reading = False
        self.writing = False

    def start(self) -> None:
        self._want_read(True)

    def push(self, data: bytes) -> None:
        """Start with `data` already read from src: sent now, any rest held until dst
        can take it (then reading starts)."""
        self.nbytes += len(data)
        sent = self._send(data)
        if sent < 0:
            return
        if sent == len(data):
            self._want_read(True)
        else:
            self.held = memoryview(data)[sent:]
            self.poller.sync(self.src_fd)  # not read until the rest is out
            self._want_write(True)

    def _send(self, data: bytes | memoryview) -> int:
        """Bytes sent (0: the destination is full); -1 after a failure, reported."""
        try:
            return self.dst.send(data)
        except _AGAIN:
            return 0
        except OSError as e:
            self.owner.failed(e)
            return -1

    def _want_read(self, on: bool) -> None:
        if on and not self.reading:
            self.poller.add_reader(self.src_fd, self._on_readable)
        elif not on and self.reading:
            self.poller.remove_reader(self.src_fd)
        self.reading = on

    def _want_write(self, on: bool) -> None:
        if on and not self.writing:
            self.poller.add_writer(self.dst_fd, self._on_writable)
        elif not on and self.writing:
            self.poller.remove_writer(self.dst_fd)
        self.writing = on

    def _make_pipe(self) -> bool:
        """False when no pipe can be had (out of file descriptors, or no os.splice): the
        direction then stays in copy mode, slower but correct, instead of failing."""
        if not HAVE_SPLICE:
            return False
        try:
            self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.fcntl(self.pipe_w, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # over the per-user pipe budget: the default 64 KiB still works
            pass
        return True

    def _copy(self) -> None:
        """Small exchanges (a greeting, a command) go through a plain recv/send: a pipe
        pair costs eight syscalls to set up and tear down, more than a short SMTP session
        moves.  The first full read or the first blocked send switches to splicing."""
        try:
            data = self.src.recv(COPY_MAX)
        except _AGAIN:
            return
        except OSError as e:
            self.owner.failed(e)
            return
        if not data:
            self._at_eof()
            return
        n = len(data)
        self.nbytes += n
        try:  # _send() inlined: this runs for every small message
            sent = self.dst.send(data)
        except _AGAIN:
            sent = 0
        except OSError as e:
            self.owner.failed(e)
            return
        if sent < n or n == COPY_MAX:
            if self._make_pipe():
                if sent < n:  # park the rest in the pipe: it holds far more
                    rest = memoryview(data)[sent:]
                    os.write(self.pipe_w, rest)
                    self.queued += len(rest)
                    self._flush()
            elif sent < n:  # hold the rest ourselves until the destination drains
                self.held = memoryview(data)[sent:]
                self._want_read(False)
                self._want_write(True)

    def _send_held(self) -> None:
        assert self.held is not None
        n = self._send(self.held)
        if n <= 0:
            return
        self.held = self.held[n:] if n < len(self.held) else None
        if self.held is None:
            self._want_write(False)
            if not self.eof:
                self._want_read(True)

    def _on_readable(self) -> None:
        if self.pipe_w < 0:
            self._copy()
            return
        try:
            n = os.splice(self.src_fd, self.pipe_w, CHUNK, flags=_FLAGS)
        except _AGAIN:
            return
        except OSError as e:
            self.owner.failed(e)
            return
        if n == 0:
            self._at_eof()
            return
        self.nbytes += n
        self.queued += n
        self._flush()

    def _on_writable(self) -> None:
        if self.held is not None:
            self._send_held()
        else:
            self._flush()

    def _flush(self) -> None:
        while self.queued:
            try:
                m = os.splice(self.pipe_r, self.dst_fd, self.queued, flags=_FLAGS)
            except _AGAIN:
                break
            except OSError as e:
                self.owner.failed(e)
                return
            self.queued -= m
        if self.queued:
            # the destination is full: stop reading the source until it drains
            self._want_read(False)
            self._want_write(True)
        else:
            self._want_write(False)
            if not self.eof:
                self._want_read(True)
            else:
                self._finish_if_drained()

    def _at_eof(self) -> None:
        self.eof = True
        if self.peer.shut and not self.queued and self.held is None:
            # the last direction, all passed on: closing both sockets sends our FIN and
            # drops them from the epoll set, no shutdown() and no epoll_ctl needed
            self.shut = True
            self.owner.check_done()
            return
        self._want_read(False)
        self._finish_if_drained()

    def _finish_if_drained(self) -> None:
        if self.eof and not self.queued and self.held is None and not self.shut:
            self.shut = True
            try:
                self.dst.shutdown(socket.SHUT_WR)  # half-close: pass the EOF on
            except OSError:
                pass
            self.owner.check_done()

    def close_pipes(self) -> None:
        for fd in (self.pipe_r, self.pipe_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass


class Splice:
    """A client/backend pair relayed with os.splice() (or copies, see the module doc)."""

    __slots__ = ("backend", "client", "done", "down", "on_done", "outcome", "poller",
                 "started", "tag", "up")

    def __init__(self, poller: Poller, client: socket.socket,
                 backend: socket.socket, on_done: Callable[[Any, str], None],
                 tag: Any = None) -> None:
        self.poller = poller
        self.client, self.backend = client, backend
        self.on_done = on_done
        self.tag = tag
        self.done = False
        self.outcome = "spliced"
        self.started = 0.0
        if client.getblocking():  # no syscall when the hand-off made it non-blocking
            client.setblocking(False)
        if backend.getblocking():
            backend.setblocking(False)
        self.up = _Direction(self, client, backend)
        self.down = _Direction(self, backend, client)
        self.up.peer, self.down.peer = self.down, self.up

    def start(self, greeting: bytes = b"") -> None:
        """`greeting`: bytes already read from the backend, for the client first."""
        self.up.start()
        if greeting:
            self.down.push(greeting)
        else:
            self.down.start()

    @property
    def bytes_up(self) -> int:
        return self.up.nbytes

    @property
    def bytes_down(self) -> int:
        return self.down.nbytes

    @property
    def nbytes(self) -> int:
        return self.up.nbytes + self.down.nbytes

    def check_done(self) -> None:
        if self.up.shut and self.down.shut:
            self._close(cut=False)

    def failed(self, exc: OSError) -> None:
        if self.outcome == "spliced":
            self.outcome = "error"
        # an error on one side: make the cut visible on the other with a RST
        self._close(cut=True)

    def abort(self, outcome: str) -> None:
        self.outcome = outcome
        self._close(cut=True)

    def _close(self, cut: bool) -> None:
        if self.done:
            return
        self.done = True
        p = self.poller
        for s in (self.client, self.backend):
            p.forget(s.fileno())  # closed below, which removes them from the epoll set
        self.up.close_pipes()
        self.down.close_pipes()
        for s in (self.client, self.backend):
            if cut:
                reset(s)
            else:
                s.close()
        self.on_done(self, self.outcome)
