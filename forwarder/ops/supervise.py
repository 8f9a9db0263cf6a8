"""Supervised tasks: nothing one task does can end another.

The first build lost its prober for good when a gate action raised inside it (a failed
listen() ended the probe loop, and the port stayed closed while the backend was up).  Every
long-lived task (a backend's prober, DNS discovery, the idle sweeper, sd_notify's watchdog)
runs under `supervised()`: an exception is logged once with its traceback, counted in
`forwarder_internal_errors_total{task}`, and the task restarted after a backoff that
doubles up to BACKOFF_MAX (and starts again from BACKOFF_FIRST once a run lasted longer
than STEADY).  Callbacks that cannot be tasks (a deadline expiring, an accepted socket
handed on) report through `internal_error()` the same way.  Cancellation is not an error:
it ends the task, which is how the owner stops it.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable

import structlog

from . import metrics

log = structlog.get_logger("forwarder.supervise")

BACKOFF_FIRST = 0.1
BACKOFF_MAX = 30.0
STEADY = 60.0  # a run this long resets the backoff


def internal_error(task: str, event: str, **fields: object) -> None:
    """Log the exception being handled, with its traceback, and count it."""
    metrics.internal_errors.labels(task).inc()
    log.exception(event, task=task, **fields)


async def supervised(task: str, run: Callable[[], Awaitable[None]], *,
                     name: str = "", backoff_first: float = BACKOFF_FIRST) -> None:
    """Run `run()` until it returns; restart it after an exception (see module doc)."""
    loop = asyncio.get_running_loop()
    backoff = backoff_first
    while True:
        started = loop.time()
        try:
            await run()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            if loop.time() - started > STEADY:
                backoff = backoff_first
            internal_error(task, "task.crashed", name=name or task,
                           restart_in=round(backoff, 3))
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, BACKOFF_MAX)


def spawn(task: str, run: Callable[[], Awaitable[None]], *, name: str = "",
          backoff_first: float = BACKOFF_FIRST) -> asyncio.Task[None]:
    """`supervised()` as a named task (names make stack dumps and /status readable)."""
    return asyncio.get_running_loop().create_task(
        supervised(task, run, name=name, backoff_first=backoff_first),
        name=f"{task} {name}".strip())


async def cancel(task: asyncio.Task[None] | None) -> None:
    """Cancel `task` and wait until it has ended (None: nothing to stop)."""
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def settle() -> None:
    """Start-up is over: move every object made so far out of the cyclic GC's way.

    What start-up builds (modules, the config, listeners) lives as long as the process;
    left in the youngest generations it is swept again and again, and each full collection
    of it stopped the loop for ~40 ms under churn (measured; gc.freeze() after start-up
    brought a session's share of GC time from ~7 to ~4 µs).  The thresholds stay as they
    are: raising them made fewer but longer pauses."""
    gc.collect()
    gc.freeze()
