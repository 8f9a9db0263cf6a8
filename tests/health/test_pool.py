"""The pool refuses a backend that is one of our own listening addresses (a forwarder
relaying to itself loops until it runs out of fds): the run-time half of the rule whose
load-time half is config/checks.is_own_address (tests/config/test_checks.py)."""

from __future__ import annotations

import asyncio

import uvloop

from forwarder.config.checks import is_own_address
from forwarder.config.model import BackendConfig, Endpoint, ProbeConfig
from forwarder.health.backends import Pool


def test_a_peer_that_is_our_own_listen_address_is_never_a_candidate() -> None:
    async def main() -> None:
        listens = [Endpoint("0.0.0.0", 2525)]
        pool = Pool("t", ProbeConfig(), None,
                    lambda sa: is_own_address(sa[1], listens, frozenset({"192.0.2.7"})))
        await pool.update([BackendConfig(Endpoint("127.0.0.1", 2525)),  # loopback: ours
                           BackendConfig(Endpoint("192.0.2.7", 2525)),  # our interface
                           BackendConfig(Endpoint("192.0.2.8", 2525)),  # another host
                           BackendConfig(Endpoint("127.0.0.1", 2526))],  # another port
                          source="dns")
        assert [b.name for b in pool.backends] == ["192.0.2.8:2525", "127.0.0.1:2526"]
        await pool.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        r.run(main())
