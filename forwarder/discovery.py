"""Peer discovery from DNS (MX or SRV).  Placeholder: `start()` is the contract."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .listener import Listener


def start(listener: Listener) -> Callable[[], Awaitable[None]]:
    """Start re-resolving the listener's discovery name; return an async stopper."""

    async def close() -> None:
        return None

    return close
