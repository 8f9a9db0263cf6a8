"""agent check against real agents on loopback answering HAProxy agent-check lines: every
state word, weights, mixed lines, garbage, silence, an agent that closes without a word,
overlong lines, answers just inside and just outside the timeout."""

from __future__ import annotations

import asyncio

import pytest

from forwarder.config.model import CheckConfig, Endpoint
from forwarder.health.checks.agent import parse
from forwarder.health.checks.common import CheckFailed
from forwarder.health.probe import run_check

from .conftest import Run
from .servers import INSIDE, LATE, OUTSIDE, Served, T, answer, refusing_port, serve, silent


def agent_check(served: Served | Endpoint, timeout: float = T) -> CheckConfig:
    port = served.endpoint.port if isinstance(served, Served) else served.port
    return CheckConfig(kind="agent", port=port, timeout=timeout)


# the backend itself: the agent runs on its host, on another port
BACKEND = Endpoint("127.0.0.1", 8025)


@pytest.mark.parametrize("line, ok, drain, detail", [
    (b"up\n", True, False, "agent says up"),
    (b"READY\r\n", True, False, "agent says ready"),
    (b"75%\n", True, False, "agent says 75%"),
    (b"up 75% maxconn:30\n", True, False, "agent says up 75% maxconn:30"),
    (b"drain\n", True, True, "drain"),
    (b"75%, drain\n", True, True, "drain"),
    (b"0%\n", True, True, "weight 0%: drain"),
    (b"maint\n", False, False, "maint"),
    (b"down\n", False, False, "agent says down"),
    (b"fail#disk full\n", False, False, "agent says fail: 'disk full'"),
    (b"stopped by the operator\n", False, False, "agent says stopped: 'by the operator'"),
    (b"up,down\n", False, False, "agent says down"),  # the cautious word wins
    (b"up maint\n", False, False, "maint"),
    (b"drain\tup\n", True, True, "drain"),
    (b"up", True, False, "agent says up"),  # ended by the agent closing
])
def test_agent_words(run: Run, line: bytes, ok: bool, drain: bool, detail: str) -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(line)
            writer.write_eof()  # HAProxy's agents answer and close
            await reader.read()

        async with serve(handler) as srv:
            res = await run_check(agent_check(srv), BACKEND)
        assert (res.ok, res.drain, res.detail) == (ok, drain, detail), res
        assert res.result == ("success" if ok else "failure")
    run(main())


@pytest.mark.parametrize("line, detail", [
    (b"hello\n", "agent answered garbage: 'hello'"),
    (b"\x1b[31mup\x00\n", "agent answered garbage: '\\x1b[31mup\\x00'"),
    (b"150x%\n", "agent answered garbage: '150x%'"),
    (b"\n", "agent sent an empty line"),
    (b"#only a comment\n", "agent answered garbage: '#only a comment'"),
    (b"u" * 600 + b"\n", "agent line longer than 512 bytes"),
    (b"", "agent closed the connection without a word"),
])
def test_garbage(run: Run, line: bytes, detail: str) -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(line)
            writer.write_eof()
            await reader.read()

        async with serve(handler) as srv:
            res = await run_check(agent_check(srv), BACKEND)
        assert (res.ok, res.result, res.detail) == (False, "failure", detail), res
        assert all(c.isprintable() for c in res.detail)
    run(main())


def test_agent_on_the_backends_host_not_its_port(run: Run) -> None:
    """target.host with check.port: the backend's own port is never contacted."""
    async def main() -> None:
        async with serve(answer(b"up\n")) as agent, serve(answer(b"")) as backend:
            res = await run_check(agent_check(agent), backend.endpoint)
            assert res.ok, res
            assert (agent.connections, backend.connections) == (1, 0)
    run(main())


def test_refused(run: Run) -> None:
    async def main() -> None:
        with refusing_port() as ep:
            res = await run_check(agent_check(ep), BACKEND)
        assert (res.ok, res.result) == (False, "failure")
        assert res.detail == f"connect to {ep}: connection refused (nothing listening)"
    run(main())


def test_no_port_configured(run: Run) -> None:
    async def main() -> None:
        res = await run_check(CheckConfig(kind="agent", timeout=T), BACKEND)
        assert (res.ok, res.detail) == (False, "agent check without a port"), res
    run(main())


def test_silence_times_out(run: Run) -> None:
    async def main() -> None:
        async with serve(silent) as srv:
            res = await run_check(agent_check(srv), BACKEND)
        assert (res.ok, res.result) == (False, "timeout"), res
        assert res.detail == f"timed out after {T:g}s waiting for the agent's answer"
        assert T - 0.01 <= res.duration < T + LATE
    run(main())


@pytest.mark.parametrize("delay, ok", [pytest.param(INSIDE, True, id="inside"),
                                       pytest.param(OUTSIDE, False, id="outside")])
def test_answer_near_the_timeout(run: Run, delay: float, ok: bool) -> None:
    async def main() -> None:
        async with serve(answer(b"up\n", delay=delay)) as srv:
            res = await run_check(agent_check(srv), BACKEND)
        assert res.ok is ok, res
        assert res.result == ("success" if ok else "timeout")
    run(main())


def test_the_check_closes_with_a_reset(run: Run) -> None:
    async def main() -> None:
        async with serve(answer(b"up\n")) as srv:
            res = await run_check(agent_check(srv), BACKEND)
            assert res.ok
            ended = await asyncio.wait_for(srv.ended.get(), 2)
            assert isinstance(ended, ConnectionResetError), ended
    run(main())


def test_parse_without_a_socket() -> None:
    assert parse(b"UP\r\n").ok
    assert parse(b"  down  #  db gone  ").detail == "agent says down: 'db gone'"
    with pytest.raises(CheckFailed, match="garbage"):
        parse(b"maxconn:10")  # understood, but says nothing about the state
