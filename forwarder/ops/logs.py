"""structlog set-up: JSON when stdout is not a terminal, key=value console otherwise."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


def setup(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """(Re)configure logging; also at a reload, so loggers are not cached on first use
    (a cached logger would keep the old level and format)."""
    out = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=out.isatty()))
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


class RateWindow:
    """Counts events in one-second windows: `hit()` returns the count in the current one.
    Shared by the log sampler and xinetd's `cps` limit, so "per second" means one thing."""

    __slots__ = ("_count", "_now", "_window")

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        self._window = float("-inf")
        self._count = 0

    def hit(self) -> int:
        now = self._now()
        if now - self._window >= 1.0:
            self._window = now
            self._count = 0
        self._count += 1
        return self._count

    def reset(self) -> None:
        self._count = 0


class Sampler:
    """Lets through at most `per_second` events a second and counts the rest, so a
    connection flood does not turn into a log flood (the metrics still count every one)."""

    __slots__ = ("_per_second", "_suppressed", "_window")

    def __init__(self, per_second: int) -> None:
        self._per_second = per_second
        self._window = RateWindow()
        self._suppressed = 0

    def allow(self) -> bool:
        if self._window.hit() <= self._per_second:
            return True
        self._suppressed += 1
        return False

    def take_suppressed(self) -> int:
        n, self._suppressed = self._suppressed, 0
        return n
