"""Health checks of every kind behind one entry point, `run_check()`.

Each kind is a small module with one `check()` coroutine (tcp, smtp, http, agent, and
exec in `command`) that returns a `Verdict` or raises `CheckFailed` with words for the
operator.  Everything a check must not be trusted to get right itself is done here, once:

- the deadline: `check.timeout` bounds every path, connect and DNS included, as one
  `asyncio.timeout` around the whole check; a check cleans up in `finally` (the exec
  check kills and reaps its process group there);
- never raising: the prober runs forever, so a bug in a check (any exception) becomes a
  failure result saying which check broke, and is logged with its traceback;
- the result record: duration, wall-clock time, and what the check learnt on the way
  (the smtp greeting latency) even when it then failed or timed out.

Cancellation from outside (the prober stopping) is not a result and is passed on.
"""

from __future__ import annotations

import asyncio
import time
from typing import assert_never

import structlog

from ...config.model import CheckConfig, Endpoint
from ..result import ProbeResult
from . import agent, command, http, smtp, tcp
from .common import CheckFailed, Progress, Verdict, os_words

__all__ = ["ProbeResult", "run_check"]

log = structlog.get_logger("forwarder.probe")


async def run_check(check: CheckConfig, target: Endpoint,
                    send_proxy: str | None = None) -> ProbeResult:
    """Run one health check of `target`; never raises, never outlives `check.timeout`
    by more than the cleanup of what it started (a killed process group)."""
    t0 = time.monotonic()
    progress = Progress()

    def done(result: str, detail: str, *, ok: bool = False, drain: bool = False
             ) -> ProbeResult:
        return ProbeResult(ok, result, detail, time.monotonic() - t0, time.time(),
                           greeting=progress.greeting, drain=drain)

    try:
        async with asyncio.timeout(check.timeout):
            verdict = await _dispatch(check, target, send_proxy, progress)
    except TimeoutError:
        return done("timeout", f"timed out after {check.timeout:g}s waiting for "
                               f"{progress.step}")
    except CheckFailed as e:
        return done("failure", e.detail)
    except OSError as e:
        return done("failure", f"{os_words(e)} while waiting for {progress.step}")
    except Exception as e:  # a bug in a check must not take the prober down
        log.exception("probe.bug", check=check.label, kind=check.kind, backend=str(target))
        return done("failure", f"the {check.kind} check failed unexpectedly "
                               f"({type(e).__name__}); the log has the details")
    if verdict.ok:
        return done("success", verdict.detail, ok=True, drain=verdict.drain)
    return done("failure", verdict.detail)


async def _dispatch(check: CheckConfig, target: Endpoint, send_proxy: str | None,
                    progress: Progress) -> Verdict:
    kind = check.kind
    if kind == "tcp":
        return await tcp.check(check, target, progress)
    if kind == "smtp":
        return await smtp.check(check, target, progress, send_proxy)
    if kind == "http":
        return await http.check(check, target, progress)
    if kind == "exec":
        return await command.check(check, target, progress)
    if kind == "agent":
        return await agent.check(check, target, progress)
    assert_never(kind)  # a kind the config let through but nobody wrote: a bug
