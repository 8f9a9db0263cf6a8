"""Deadlines: one timer for many, exact to the loop clock, bounded heap, contained errors."""

from __future__ import annotations

import asyncio

import uvloop

from forwarder.ops.metrics import REGISTRY
from forwarder.traffic.deadlines import COMPACT_SLACK, Deadlines


class Item:
    def __init__(self, loop: asyncio.AbstractEventLoop, log: list[tuple[str, float]],
                 name: str, boom: bool = False) -> None:
        self.token = 0
        self.loop, self.log, self.name, self.boom = loop, log, name, boom

    def expire(self) -> None:
        self.log.append((self.name, self.loop.time()))
        if self.boom:
            raise RuntimeError("expire failed")


def run(coro: object) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        r.run(asyncio.wait_for(coro, 10))  # type: ignore[arg-type]


def test_each_fires_once_in_order_at_its_time_and_cleared_ones_never() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        d = Deadlines(loop)
        log: list[tuple[str, float]] = []
        t0 = loop.time()
        a, b, c, e = (Item(loop, log, n) for n in "abce")
        d.set(c, t0 + 0.15)
        d.set(a, t0 + 0.05)
        d.set(b, t0 + 0.10)
        d.set(e, t0 + 0.12)
        d.clear(e)
        d.set(b, t0 + 0.20)  # moved later: fires once, at the new time
        assert len(d) == 3
        done = loop.create_future()
        loop.call_at(t0 + 0.3, done.set_result, None)
        await done
        assert [n for n, _ in log] == ["a", "c", "b"]
        for (_, at), want in zip(log, (0.05, 0.15, 0.20), strict=True):
            assert -0.002 <= at - t0 - want < 0.010
        assert len(d) == 0
        d.close()
    run(main())


def test_stale_entries_are_compacted_so_the_heap_stays_bounded() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        d = Deadlines(loop)
        items = [Item(loop, [], str(i)) for i in range(10 * COMPACT_SLACK)]
        for it in items:  # the churn pattern: set, then cleared long before it is due
            d.set(it, loop.time() + 60)
            d.clear(it)
            assert len(d._heap) <= 2 * (len(d) + 1) + COMPACT_SLACK
        d.close()
    run(main())


def test_a_failing_expire_is_counted_and_the_others_still_fire() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        d = Deadlines(loop)
        log: list[tuple[str, float]] = []
        before = REGISTRY.get_sample_value("forwarder_internal_errors_total",
                                           {"task": "handoff"}) or 0
        d.set(Item(loop, log, "bad", boom=True), loop.time() + 0.01)
        d.set(Item(loop, log, "good"), loop.time() + 0.01)
        done = loop.create_future()
        loop.call_later(0.1, done.set_result, None)
        await done
        assert sorted(n for n, _ in log) == ["bad", "good"]
        after = REGISTRY.get_sample_value("forwarder_internal_errors_total",
                                          {"task": "handoff"})
        assert after == before + 1
        d.close()
    run(main())
