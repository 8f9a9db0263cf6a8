"""Access rules and limits, applied at accept time before any backend is contacted.

xinetd's semantics: `only_from` empty admits everyone; when an address matches both
`only_from` and `no_access`, the more specific entry (longer prefix) wins; `instances` caps
concurrent connections of the service, `per_source` per client address; `cps = [rate, pause]`
closes the service for `pause` seconds once more than `rate` connections arrive within one
second (here: the gate closes, so senders get refused, then it reopens by itself).

Host names in the lists were resolved by the load step (config/load.py), so nothing here
can fail on a configuration.  Access owns the admission counters; the listener calls
admit() once per accepted connection and release() once when it ends.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Callable

from ..config.model import AccessConfig, Network
from ..ops.logs import RateWindow


def _best(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: tuple[Network, ...]) -> int:
    """Longest matching prefix length, -1 when none matches."""
    best = -1
    for n in nets:
        if ip.version == n.version and ip in n and n.prefixlen > best:
            best = n.prefixlen
    return best


class Access:
    def __init__(self, cfg: AccessConfig, now: Callable[[], float],
                 hold: Callable[[str, float], None]) -> None:
        self.cfg = cfg
        self.active = 0
        self.per_source: defaultdict[str, int] = defaultdict(int)
        self._hold = hold
        self._rate = RateWindow(now)
        self.trivial = cfg == AccessConfig()

    def take_over(self, old: Access, live: list[str]) -> None:
        """A reload replaced the rules: keep counting the connections already admitted
        (`live`: their client addresses; counted afresh when the old rules counted
        nothing)."""
        if old.trivial:
            for host in live:
                self.active += 1
                self.per_source[host] += 1
        else:
            self.active, self.per_source = old.active, old.per_source

    def admit(self, host: str) -> str | None:
        """None to admit (and count) the connection, else the refusal outcome."""
        cfg = self.cfg
        if cfg.only_from_nets or cfg.no_access_nets:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            allow = _best(ip, cfg.only_from_nets) if cfg.only_from_nets else 0
            deny = _best(ip, cfg.no_access_nets)
            if allow < 0 or deny >= allow:
                return "refused_acl"
        if cfg.cps is not None and self._rate.hit() > cfg.cps.rate:
            self._rate.reset()
            self._hold("cps", cfg.cps.pause)
            return "rate_limited"
        if cfg.instances is not None and self.active >= cfg.instances:
            return "rate_limited"
        if cfg.per_source is not None and self.per_source[host] >= cfg.per_source:
            return "rate_limited"
        self.active += 1
        self.per_source[host] += 1
        return None

    def release(self, host: str) -> None:
        self.active = max(0, self.active - 1)
        n = self.per_source.get(host, 0) - 1
        if n <= 0:
            self.per_source.pop(host, None)
        else:
            self.per_source[host] = n
