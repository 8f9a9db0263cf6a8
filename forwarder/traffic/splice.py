"""Zero-copy relay for Linux: socket -> pipe -> socket with os.splice(), per direction.

The bytes never enter Python: each readiness callback moves up to CHUNK bytes through a
kernel pipe.

Readiness comes from our own epoll set, itself registered once with the event loop:
uvloop's add_reader() silently drops a reader when the fd reports EPOLLERR (libuv stops
the poll handle, uvloop swallows the OSError), so a backend's RST would leave the splice
hanging.  Our epoll reports ERR/HUP as readable and writable, and the splice sees the error
on its next os.splice() call.

Same contract as relay.Splice: half-close per direction, flow control (a direction stops
reading while its pipe cannot be flushed), a RST to the other side on an error,
`on_done(splice, outcome)` exactly once.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import select
import socket
import struct
from collections.abc import Callable
from typing import Any

CHUNK = 1 << 20
COPY_MAX = 16384
PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_LINGER_RST = struct.pack("ii", 1, 0)
_AGAIN = (BlockingIOError, InterruptedError)


def available() -> bool:
    return hasattr(os, "splice")


Callback = Callable[[], None]
_IN = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP | select.EPOLLRDHUP
_OUT = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP


class Poller:
    """One epoll set per event loop, for the splice relays' sockets."""

    _instances: dict[int, Poller] = {}

    @classmethod
    def for_loop(cls, loop: asyncio.AbstractEventLoop) -> Poller:
        p = cls._instances.get(id(loop))
        if p is None or p.loop is not loop:
            p = cls._instances[id(loop)] = Poller(loop)
        return p

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ep = select.epoll()
        self.readers: dict[int, Callback] = {}
        self.writers: dict[int, Callback] = {}
        self.masks: dict[int, int] = {}
        # fds dropped while a batch of events is dispatched: the rest of that batch may
        # hold stale events for them, and a new socket may already reuse the number
        self._dead: set[int] = set()
        loop.add_reader(self.ep.fileno(), self._ready)

    def _update(self, fd: int) -> None:
        mask = (select.EPOLLIN | select.EPOLLRDHUP if fd in self.readers else 0) | \
               (select.EPOLLOUT if fd in self.writers else 0)
        old = self.masks.get(fd)
        if mask == old:
            return
        if not mask:
            del self.masks[fd]
            self._dead.add(fd)
            try:
                self.ep.unregister(fd)
            except OSError:
                pass
        elif old is None:
            self.ep.register(fd, mask)
            self.masks[fd] = mask
        else:
            self.ep.modify(fd, mask)
            self.masks[fd] = mask

    def add_reader(self, fd: int, cb: Callback) -> None:
        self.readers[fd] = cb
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        if self.readers.pop(fd, None) is not None:
            self._update(fd)

    def add_writer(self, fd: int, cb: Callback) -> None:
        self.writers[fd] = cb
        self._update(fd)

    def remove_writer(self, fd: int) -> None:
        if self.writers.pop(fd, None) is not None:
            self._update(fd)

    # Cheaper transitions for the hand-off (each epoll_ctl is a syscall per connection):

    def swap_to_reader(self, fd: int, cb: Callback) -> None:
        """Writable-wait becomes readable-wait with one epoll_ctl."""
        self.writers.pop(fd, None)
        self.readers[fd] = cb
        self._update(fd)

    def drop_writer(self, fd: int) -> None:
        """No callback any more, but the kernel registration stays until the caller's
        next add_reader turns it into a read registration (one epoll_ctl, not two)."""
        self.writers.pop(fd, None)

    def drop_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def forget(self, fd: int) -> None:
        """The caller closes fd next, which removes it from the epoll set: no epoll_ctl."""
        self.readers.pop(fd, None)
        self.writers.pop(fd, None)
        self.masks.pop(fd, None)
        self._dead.add(fd)

    def _ready(self) -> None:
        dead = self._dead
        dead.clear()
        for fd, ev in self.ep.poll(0, 512):
            if fd in dead:
                continue
            if ev & _IN:
                cb = self.readers.get(fd)
                if cb is not None:
                    cb()
            if ev & _OUT:
                cb = self.writers.get(fd)
                if cb is not None:
                    cb()


class _Direction:
    __slots__ = ("dst", "dst_fd", "eof", "held", "nbytes", "owner", "peer", "pipe_r",
                 "pipe_w", "poller", "queued", "reading", "shut", "src", "src_fd", "writing")

    def __init__(self, owner: PipeSplice, src: socket.socket, dst: socket.socket) -> None:
        self.owner = owner
        self.peer: _Direction = self  # the other direction, set by PipeSplice
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
        try:
            sent = self.dst.send(data)
        except _AGAIN:
            sent = 0
        except OSError as e:
            self.owner.failed(e)
            return
        if sent == len(data):
            self._want_read(True)
        else:
            self.held = memoryview(data)[sent:]
            self.poller._update(self.src_fd)  # not read until the rest is out
            self._want_write(True)

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
        """False when no pipe can be had (out of file descriptors): the direction then
        stays in copy mode, slower but correct, instead of failing the session."""
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
        self.nbytes += len(data)
        try:
            sent = self.dst.send(data)
        except _AGAIN:
            sent = 0
        except OSError as e:
            self.owner.failed(e)
            return
        if sent < len(data) or len(data) == COPY_MAX:
            if self._make_pipe():
                if sent < len(data):  # park the rest in the pipe: it holds far more
                    rest = memoryview(data)[sent:]
                    os.write(self.pipe_w, rest)
                    self.queued += len(rest)
                    self._flush()
            elif sent < len(data):  # hold the rest ourselves until the destination drains
                self.held = memoryview(data)[sent:]
                self._want_read(False)
                self._want_write(True)

    def _send_held(self) -> None:
        assert self.held is not None
        try:
            n = self.dst.send(self.held)
        except _AGAIN:
            return
        except OSError as e:
            self.owner.failed(e)
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


class PipeSplice:
    """A client/backend pair relayed with os.splice()."""

    __slots__ = ("backend", "client", "done", "down", "on_done", "outcome", "poller",
                 "started", "tag", "up")

    def __init__(self, loop: asyncio.AbstractEventLoop, client: socket.socket,
                 backend: socket.socket, on_done: Callable[[Any, str], None],
                 tag: Any = None) -> None:
        self.poller = Poller.for_loop(loop)
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
            self._close(reset=False)

    def failed(self, exc: OSError) -> None:
        if self.outcome == "spliced":
            self.outcome = "error"
        # an error on one side: make the cut visible on the other with a RST
        self._close(reset=True)

    def abort(self, outcome: str) -> None:
        self.outcome = outcome
        self._close(reset=True)

    def _close(self, reset: bool) -> None:
        if self.done:
            return
        self.done = True
        p = self.poller
        for s in (self.client, self.backend):
            p.forget(s.fileno())  # closed below, which removes them from the epoll set
        self.up.close_pipes()
        self.down.close_pipes()
        for s in (self.client, self.backend):
            if reset:
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                except OSError:
                    pass
            s.close()
        self.on_done(self, self.outcome)


async def poll_readable(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                        timeout: float) -> bool:
    """True once `sock` is readable (data, EOF or an error), False after `timeout`."""
    poller = Poller.for_loop(loop)
    fut: asyncio.Future[bool] = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(True)

    def expired() -> None:
        if not fut.done():
            fut.set_result(False)

    poller.add_reader(fd, ready)
    timer = loop.call_later(timeout, expired)
    try:
        return await fut
    finally:
        timer.cancel()
        poller.remove_reader(fd)


async def poll_connect(loop: asyncio.AbstractEventLoop, host: str, port: int,
                       timeout: float) -> socket.socket:
    """A non-blocking TCP connect that fails as soon as the kernel knows (refused,
    unreachable) and raises TimeoutError after `timeout`."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
    except socket.gaierror:  # a host name: resolve without blocking the loop
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, stype, proto, _, addr = infos[0]
    sock = socket.socket(family, stype, proto)
    sock.setblocking(False)
    try:
        err = sock.connect_ex(addr)
        if err == errno.EINPROGRESS:
            poller = Poller.for_loop(loop)
            fut: asyncio.Future[None] = loop.create_future()
            fd = sock.fileno()

            def done() -> None:
                if not fut.done():
                    fut.set_result(None)

            poller.add_writer(fd, done)
            def expired() -> None:
                if not fut.done():
                    fut.set_exception(TimeoutError(f"connect to {host}:{port} timed out"))

            timer = loop.call_later(timeout, expired)
            try:
                await fut
            finally:
                timer.cancel()
                poller.remove_writer(fd)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sock
