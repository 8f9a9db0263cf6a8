"""The relay's compiled core, and the choice between it and the pure-Python splice.

`_core` (built from _core.c by the install step when a C compiler is present) runs
splice.py's rules below the interpreter: one epoll set per event loop whose events are all
handled in C, Python called only when a pair ends.  Same contract as splice.Splice (the
reference and the fallback): half-close, flow control, every byte delivered or the other
side reset, on_done(pair, outcome) exactly once.  `relay = "python"` keeps the Python
relay; "auto" (the default) takes the core when it was built.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from ..ops import supervise
from .poller import Poller
from .splice import Splice

try:
    from . import _core  # type: ignore[attr-defined]
except ImportError:  # no compiler at install time
    _core = None

AVAILABLE = _core is not None
Done = Callable[[Any, str], None]


class Relayed(Protocol):
    """What Connections needs of a relayed pair (a Splice, or a _core.Pair)."""

    tag: Any
    started: float

    @property
    def bytes_up(self) -> int: ...

    @property
    def bytes_down(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    def start(self, greeting: bytes = b"") -> None: ...

    def abort(self, outcome: str) -> None: ...


def use_core(kind: str) -> bool:
    """Which relay a listener's `relay` setting gets (config/toml.py refuses "core" when
    the core was not built)."""
    return AVAILABLE and kind != "python"


def core_relay(kind: str, loop: asyncio.AbstractEventLoop) -> CoreRelay | None:
    """The loop's core relay for a listener set to `kind`, None for the Python relay.
    Taken when the listener starts, not on its first connection, so the relay's one epoll
    fd is part of the process's resting fd count."""
    return CoreRelay.for_loop(loop) if use_core(kind) else None


class CoreRelay:
    """The per-loop _core.Relay, polled by the loop."""

    _instances: ClassVar[dict[int, CoreRelay]] = {}

    @classmethod
    def for_loop(cls, loop: asyncio.AbstractEventLoop) -> CoreRelay:
        r = cls._instances.get(id(loop))
        if r is None or r.loop is not loop or r.loop.is_closed():
            r = cls._instances[id(loop)] = CoreRelay(loop)
        return r

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        assert _core is not None
        self.loop = loop
        self.relay = _core.Relay()
        loop.add_reader(self.relay.fileno(), self._ready)

    def _ready(self) -> None:
        try:
            self.relay.poll()
        except Exception:  # an on_done callback failed; the core went on with the rest
            supervise.internal_error("relay", "relay.callback_failed")


def relay_pair(core: CoreRelay | None, poller: Poller, client: socket.socket,
               backend: socket.socket, on_done: Done, tag: Any) -> Relayed:
    """A pair ready to start(): the core's when the listener has one (core_relay)."""
    if core is None:
        return Splice(poller, client, backend, on_done, tag)
    if client.getblocking():
        client.setblocking(False)
    if backend.getblocking():
        backend.setblocking(False)
    # the hand-off may have left the backend registered in the Poller's epoll set
    poller.unregister(backend.fileno())
    pair: Relayed = core.relay.pair(client.detach(), backend.detach(), on_done, tag)
    return pair
