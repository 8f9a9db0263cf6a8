"""Every probe test runs in its own event loop, once on asyncio's default loop and once on
uvloop (the forwarder's): `run(coro)` runs the coroutine to its end, bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
import uvloop

T = TypeVar("T")
TEST_BOUND = 15.0  # seconds: a hung test fails instead of stalling the suite

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


class Run:
    def __init__(self, loop: str) -> None:
        self.loop = loop

    def __call__(self, coro: Coroutine[Any, Any, T]) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(TEST_BOUND):
                return await coro

        with asyncio.Runner(loop_factory=LOOPS[self.loop]) as runner:
            return runner.run(bounded())


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Run:
    return Run(request.param)
