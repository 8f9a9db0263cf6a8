"""One timer for many deadlines, exact to the event loop's clock.

Every pending hand-off has a deadline (connect, greeting).  A TimerHandle created and
cancelled per step was a measurable share of a short session's cost, and a periodic tick
(the first build's 50 ms watchdog) makes a limit mean "up to 50 ms later".  Here a heap
holds (when, token, item) and a single loop timer is armed for the earliest entry, so a
deadline fires when it says.  Clearing or moving a deadline only invalidates its token: the
stale entry stays in the heap until it surfaces or the heap is compacted (when stale
entries outnumber live ones), which keeps both setting and clearing O(log n) without a
search, and every pass over the heap bounded.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from typing import Protocol

import structlog

from ..ops import supervise

log = structlog.get_logger("forwarder.deadlines")

COMPACT_SLACK = 1024  # stale entries tolerated beyond the live ones before a compaction
EARLY = 0.001  # uvloop rounds timers to the millisecond: accept that much earliness


class Expiring(Protocol):
    """An object with a deadline: `token` is Deadlines' bookkeeping (0: none set)."""

    token: int

    def expire(self) -> None: ...


class Deadlines:
    def __init__(self, loop: asyncio.AbstractEventLoop, task: str = "handoff") -> None:
        self.loop = loop
        self.task = task
        self._heap: list[tuple[float, int, Expiring]] = []
        self._seq = 0
        self._live = 0
        self._timer: asyncio.TimerHandle | None = None
        self._armed = math.inf

    def __len__(self) -> int:
        return self._live

    def set(self, item: Expiring, when: float) -> None:
        """Give `item` the deadline `when` (loop time), replacing any it had."""
        if not item.token:
            self._live += 1
        self._seq += 1
        item.token = self._seq
        heapq.heappush(self._heap, (when, self._seq, item))
        if when < self._armed:
            self._arm(when)
        if len(self._heap) > 2 * self._live + COMPACT_SLACK:
            self._compact()

    def clear(self, item: Expiring) -> None:
        """No deadline for `item` any more (its heap entry goes stale)."""
        if item.token:
            item.token = 0
            self._live -= 1

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed = math.inf
        for _, _, item in self._heap:
            item.token = 0
        self._heap.clear()
        self._live = 0

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed = when
        self._timer = self.loop.call_at(when, self._fire)

    def _compact(self) -> None:
        self._heap = [e for e in self._heap if e[2].token == e[1]]
        heapq.heapify(self._heap)

    def _fire(self) -> None:
        self._timer = None
        self._armed = math.inf
        heap = self._heap
        now = self.loop.time() + EARLY
        while heap and heap[0][0] <= now:
            _, token, item = heapq.heappop(heap)
            if item.token != token:
                continue  # cleared or moved
            item.token = 0
            self._live -= 1
            try:
                item.expire()
            except Exception:  # one bad item must not stop the others' deadlines
                supervise.internal_error(self.task, "deadline.expire_failed")
        while heap and heap[0][2].token != heap[0][1]:
            heapq.heappop(heap)
        if heap:
            self._arm(heap[0][0])
