"""Supervised tasks: a crash is logged, counted and the task restarted; cancel ends it."""

from __future__ import annotations

import asyncio

import uvloop

from forwarder.ops import supervise
from forwarder.ops.metrics import REGISTRY


def errors(task: str) -> float:
    return REGISTRY.get_sample_value("forwarder_internal_errors_total", {"task": task}) or 0.0


def test_a_crashing_task_is_restarted_with_backoff_and_counted() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        runs: list[float] = []
        third = asyncio.Event()

        async def flaky() -> None:
            runs.append(loop.time())
            if len(runs) == 3:
                third.set()
                await asyncio.Event().wait()  # the third run stays up
            raise RuntimeError("boom")

        before = errors("probe")
        t = supervise.spawn("probe", flaky, name="x", backoff_first=0.02)
        async with asyncio.timeout(5):
            await third.wait()
        assert errors("probe") == before + 2
        assert runs[2] - runs[1] >= runs[1] - runs[0] >= 0.02  # the backoff doubles
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)
        assert t.cancelled()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        r.run(main())
