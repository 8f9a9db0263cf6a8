"""Admin HTTP listener (/metrics, /healthz, /readyz, /status, drain/resume).

Placeholder until the observability work lands: `start()` is the contract service.py uses.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .config import Endpoint

if TYPE_CHECKING:
    from .service import Service


async def start(endpoint: Endpoint, service: Service) -> Callable[[], Awaitable[None]]:
    """Start serving on `endpoint`; return an async function that stops it."""

    async def close() -> None:
        return None

    return close
