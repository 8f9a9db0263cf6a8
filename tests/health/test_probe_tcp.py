"""tcp check against real sockets on loopback: up, refused, hung (SYN dropped), a backend
that talks first, a handshake that completes just inside or just outside the timeout, and
the RST close (no TIME_WAIT per probe)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from forwarder.config.model import CheckConfig, Endpoint
from forwarder.health.probe import run_check

from .conftest import Run
from .servers import LATE, T, answer, blackhole, refusing_port, serve

TCP = CheckConfig(kind="tcp", timeout=T)


def test_up_and_closed_with_a_reset(run: Run) -> None:
    async def main() -> None:
        async with serve(answer(b"")) as srv:
            res = await run_check(TCP, srv.endpoint)
            assert (res.ok, res.result) == (True, "success"), res
            assert res.detail == f"connected to {srv.endpoint}"
            assert res.greeting is None and res.drain is False
            assert 0 < res.duration < TCP.timeout
            # the server's read ends in ECONNRESET: a RST, not a FIN (no TIME_WAIT here)
            ended = await asyncio.wait_for(srv.ended.get(), 2)
            assert isinstance(ended, ConnectionResetError), ended
    run(main())


def test_refused_is_down(run: Run) -> None:
    async def main() -> None:
        with refusing_port() as ep:
            res = await run_check(TCP, ep)
        assert (res.ok, res.result) == (False, "failure")
        assert res.detail == f"connect to {ep}: connection refused (nothing listening)"
    run(main())


def test_backend_talking_first_is_still_up(run: Run) -> None:
    """tcp proves the handshake only: whatever the backend sends is not read."""
    async def main() -> None:
        async with serve(answer(b"\x00\xffgarbage\r\n" * 100)) as srv:
            res = await run_check(TCP, srv.endpoint)
        assert res.ok, res
    run(main())


@pytest.mark.parametrize("timeout, ok", [pytest.param(1.5, True, id="inside"),
                                         pytest.param(T, False, id="outside")])
def test_handshake_near_the_timeout(run: Run, timeout: float, ok: bool) -> None:
    """The accept queue is full, so the kernel drops the SYN; room is made at 0.2 s and
    the SYN is resent after 1 s: the handshake completes at ~1.0 s, inside a 1.5 s
    timeout; a shorter one ends waiting for it (a host that drops SYNs)."""
    async def main() -> None:
        with blackhole() as (ep, listener):
            listener.setblocking(False)
            loop = asyncio.get_running_loop()
            room = loop.call_later(0.2, lambda: listener.accept()[0].close())
            res = await run_check(CheckConfig(kind="tcp", timeout=timeout), ep)
            room.cancel()
        if ok:
            assert (res.ok, res.result) == (True, "success"), res
            assert 0.8 < res.duration < timeout  # it did wait for the resent SYN
        else:
            assert (res.ok, res.result) == (False, "timeout"), res
            assert res.detail == f"timed out after {T:g}s waiting for the connect to {ep}"
            assert timeout - 0.01 <= res.duration < timeout + LATE
    run(main())


def test_ipv6_loopback(run: Run) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1 here")

    async def main() -> None:
        async with serve(answer(b""), host="::1") as srv:
            res = await run_check(TCP, srv.endpoint)
        assert res.ok and res.detail == f"connected to [::1]:{srv.endpoint.port}", res
        with refusing_port("::1") as ep:
            res = await run_check(TCP, ep)
        assert not res.ok and "[::1]" in res.detail
    run(main())


def test_unresolvable_name_is_a_failure(run: Run) -> None:
    async def main() -> None:
        res = await run_check(TCP, Endpoint("no-such-host.invalid", 25))
        # a resolver that does not answer within the timeout is a timeout instead
        assert res.result in ("failure", "timeout"), res
        if res.result == "failure":
            assert res.detail.startswith("cannot resolve no-such-host.invalid: ")
    run(main())
