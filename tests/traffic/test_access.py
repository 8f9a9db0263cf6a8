"""Access rules with an injected clock: xinetd's semantics, no sockets needed."""

from __future__ import annotations

import ipaddress

from forwarder.config.model import AccessConfig, Cps
from forwarder.traffic.access import Access


def access(clock: list[float], holds: list[tuple[str, float]], **kw: object) -> Access:
    only: tuple[str, ...] = tuple(kw.pop("only_from", ()))  # type: ignore[arg-type]
    deny: tuple[str, ...] = tuple(kw.pop("no_access", ()))  # type: ignore[arg-type]
    cfg = AccessConfig(only_from=only, no_access=deny,
                       only_from_nets=tuple(ipaddress.ip_network(x) for x in only),
                       no_access_nets=tuple(ipaddress.ip_network(x) for x in deny),
                       **kw)  # type: ignore[arg-type]
    return Access(cfg, lambda: clock[0], lambda r, s: holds.append((r, s)))


def test_longest_prefix_wins_between_only_from_and_no_access() -> None:
    a = access([0.0], [], only_from=["10.0.0.0/8"], no_access=["10.1.0.0/16"])
    assert a.admit("10.2.3.4") is None
    assert a.admit("10.1.2.3") == "refused_acl"
    assert a.admit("192.0.2.1") == "refused_acl"
    assert a.admit("::ffff:10.2.3.4") is None  # IPv4-mapped counts as IPv4


def test_instances_and_per_source_are_released() -> None:
    a = access([0.0], [], instances=2, per_source=1)
    assert a.admit("192.0.2.1") is None
    assert a.admit("192.0.2.1") == "rate_limited"  # per_source
    assert a.admit("192.0.2.2") is None
    assert a.admit("192.0.2.3") == "rate_limited"  # instances
    a.release("192.0.2.1")
    assert a.admit("192.0.2.3") is None
    assert a.active == 2 and dict(a.per_source) == {"192.0.2.2": 1, "192.0.2.3": 1}


def test_cps_holds_the_gate_once_the_rate_is_passed_within_one_second() -> None:
    clock, holds = [100.0], list[tuple[str, float]]()
    a = access(clock, holds, cps=Cps(3, 7.0))
    for _ in range(3):
        assert a.admit("192.0.2.1") is None
    clock[0] = 100.9  # same window
    assert a.admit("192.0.2.1") == "rate_limited"
    assert holds == [("cps", 7.0)]
    clock[0] = 102.0  # a new window
    for _ in range(3):
        assert a.admit("192.0.2.1") is None
    assert holds == [("cps", 7.0)]


def test_a_reload_that_adds_limits_counts_the_live_connections() -> None:
    old = access([0.0], [])
    assert old.trivial
    new = access([0.0], [], instances=2)
    new.take_over(old, ["192.0.2.1", "192.0.2.1"])
    assert new.admit("192.0.2.9") == "rate_limited"
    new.release("192.0.2.1")
    assert new.admit("192.0.2.9") is None
