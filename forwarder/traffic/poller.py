"""Our own epoll set for the hand-off's and the relay's sockets, itself one reader of the
event loop.

Why not loop.add_reader(): uvloop silently drops a reader whose fd reports EPOLLERR
(libuv stops the poll handle and uvloop swallows the OSError), so a backend's RST or an
asynchronous connect refusal would leave the waiter hanging until its deadline.  Here
ERR/HUP wake both the reader and the writer, which see the error on their next call.

Each epoll_ctl is a syscall per connection, so the hand-off gets cheaper transitions
(`swap_to_reader`, `drop_writer`, `drop_reader`, `forget`) that leave the kernel
registration in place when the next step re-arms the same fd anyway.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable
from typing import ClassVar

from ..ops import supervise

Callback = Callable[[], None]
_IN = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP | select.EPOLLRDHUP
_OUT = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
BATCH = 512  # events per wake-up


class Poller:
    """One epoll set per event loop."""

    _instances: ClassVar[dict[int, Poller]] = {}

    @classmethod
    def for_loop(cls, loop: asyncio.AbstractEventLoop) -> Poller:
        p = cls._instances.get(id(loop))
        if p is None or p.loop is not loop or p.closed:
            p = cls._instances[id(loop)] = Poller(loop)
        return p

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ep = select.epoll()
        self.closed = False
        self.readers: dict[int, Callback] = {}
        self.writers: dict[int, Callback] = {}
        self.masks: dict[int, int] = {}
        self.exclusive: set[int] = set()  # listening sockets shared by worker processes
        # fds dropped while a batch of events is dispatched: the rest of that batch may
        # hold stale events for them, and a new socket may already reuse the number
        self._dead: set[int] = set()
        loop.add_reader(self.ep.fileno(), self._ready)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.ep.fileno())
            self.ep.close()

    def sync(self, fd: int) -> None:
        """Make the kernel registration of fd match its callbacks."""
        mask = (select.EPOLLIN | select.EPOLLRDHUP if fd in self.readers else 0) | \
               (select.EPOLLOUT if fd in self.writers else 0)
        old = self.masks.get(fd)
        if mask == old:
            return
        if not mask:
            del self.masks[fd]
            self._dead.add(fd)
            self.exclusive.discard(fd)
            try:
                self.ep.unregister(fd)
            except OSError:
                pass
        elif old is None:
            # EPOLLEXCLUSIVE takes EPOLLIN but not EPOLLRDHUP (EINVAL)
            self.ep.register(fd, (select.EPOLLIN | select.EPOLLEXCLUSIVE)
                             if fd in self.exclusive else mask)
            self.masks[fd] = mask
        else:
            self.ep.modify(fd, mask)
            self.masks[fd] = mask

    def add_reader(self, fd: int, cb: Callback, *, exclusive: bool = False) -> None:
        """`exclusive`: EPOLLEXCLUSIVE, for a listening socket several processes poll (one
        wake-up per connection); such an fd takes no writer (the flag forbids a MOD)."""
        if exclusive:
            self.exclusive.add(fd)
        self.readers[fd] = cb
        self.sync(fd)

    def remove_reader(self, fd: int) -> None:
        if self.readers.pop(fd, None) is not None:
            self.sync(fd)

    def add_writer(self, fd: int, cb: Callback) -> None:
        self.writers[fd] = cb
        self.sync(fd)

    def remove_writer(self, fd: int) -> None:
        if self.writers.pop(fd, None) is not None:
            self.sync(fd)

    def swap_to_reader(self, fd: int, cb: Callback) -> None:
        """Writable-wait becomes readable-wait with one epoll_ctl."""
        self.writers.pop(fd, None)
        self.readers[fd] = cb
        self.sync(fd)

    def drop_writer(self, fd: int) -> None:
        """No callback any more, but the kernel registration stays until the caller's
        next add_reader turns it into a read registration (one epoll_ctl, not two)."""
        self.writers.pop(fd, None)

    def drop_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def unregister(self, fd: int) -> None:
        """fd leaves this set now (another epoll set takes it: the relay's core)."""
        self.readers.pop(fd, None)
        self.writers.pop(fd, None)
        if self.masks.pop(fd, None) is not None:
            self._dead.add(fd)
            self.exclusive.discard(fd)
            try:
                self.ep.unregister(fd)
            except OSError:
                pass

    def forget(self, fd: int) -> None:
        """The caller closes fd next, which removes it from the epoll set: no epoll_ctl."""
        self.readers.pop(fd, None)
        self.writers.pop(fd, None)
        self.masks.pop(fd, None)
        self._dead.add(fd)

    def _ready(self) -> None:
        dead = self._dead
        dead.clear()
        for fd, ev in self.ep.poll(0, BATCH):
            if fd in dead:
                continue
            try:  # free in CPython 3.11 unless it raises
                if ev & _IN:
                    cb = self.readers.get(fd)
                    if cb is not None:
                        cb()
                if ev & _OUT:
                    cb = self.writers.get(fd)
                    if cb is not None:
                        cb()
            except Exception:  # one connection's bug must not stop the others' events
                supervise.internal_error("relay", "poller.callback_failed", fd=fd)
