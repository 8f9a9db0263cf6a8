"""The entry point's own promises, whatever the kind: a bug in a check is a failure result
in plain words (and a log entry), never an exception; the deadline holds even for a check
that ignores it; cancellation from outside is passed on; the result record keeps the
fields the prober, the metrics and /status already read."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from structlog.testing import capture_logs

from forwarder.config.model import CheckConfig, Endpoint
from forwarder.health import checks
from forwarder.health.probe import ProbeResult, run_check

from .conftest import Run

BACKEND = Endpoint("127.0.0.1", 9)


def test_a_bug_in_a_check_is_a_failure(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(*_: Any) -> None:
        raise KeyError("oops")

    monkeypatch.setattr(checks.tcp, "check", broken)

    async def main() -> None:
        with capture_logs() as logs:
            res = await run_check(CheckConfig(kind="tcp", timeout=1), BACKEND)
        assert (res.ok, res.result) == (False, "failure")
        assert res.detail == ("the tcp check failed unexpectedly (KeyError); "
                              "the log has the details")
        assert [e["event"] for e in logs] == ["probe.bug"]
    run(main())


def test_unknown_kind_is_a_failure(run: Run) -> None:
    async def main() -> None:
        cfg = CheckConfig(kind="ldap", timeout=1)  # type: ignore[arg-type]
        res = await run_check(cfg, BACKEND)
        assert (res.ok, res.result) == (False, "failure"), res
    run(main())


def test_deadline_holds_for_a_check_that_ignores_it(run: Run,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    async def forever(cfg: CheckConfig, target: Endpoint, progress: Any) -> None:
        progress.step = "the end of time"
        await asyncio.Event().wait()

    monkeypatch.setattr(checks.tcp, "check", forever)

    async def main() -> None:
        res = await run_check(CheckConfig(kind="tcp", timeout=0.1), BACKEND)
        assert (res.result, res.detail) == ("timeout",
                                            "timed out after 0.1s waiting for the end of time")
        assert res.duration < 0.3
    run(main())


def test_cancellation_from_outside_is_not_a_result(run: Run) -> None:
    async def main() -> None:
        connected = asyncio.Event()

        async def serve_nothing(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            connected.set()
            await r.read()
            w.close()

        server = await asyncio.start_server(serve_nothing, "127.0.0.1", 0)
        ep = Endpoint("127.0.0.1", server.sockets[0].getsockname()[1])
        task = asyncio.ensure_future(run_check(CheckConfig(kind="smtp", timeout=5), ep))
        await asyncio.wait_for(connected.wait(), 2)  # it waits for the greeting now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        server.close()
        await server.wait_closed()
    run(main())


def test_result_record_keeps_the_old_shape() -> None:
    r = ProbeResult(True, "success", "connected", 0.01, 1.0)
    assert (r.greeting, r.drain) == (None, False)
