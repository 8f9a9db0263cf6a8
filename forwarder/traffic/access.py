"""Access rules and limits, applied at accept time before any backend is contacted.

xinetd's semantics: `only_from` empty admits everyone; when an address matches both
`only_from` and `no_access`, the more specific entry (longer prefix) wins; `instances` caps
concurrent connections of the service, `per_source` per client address; `cps = [rate, pause]`
closes the service for `pause` seconds once more than `rate` connections arrive within one
second (here: the gate closes, so senders get refused, then it reopens by itself).
"""

from __future__ import annotations

import ipaddress
import socket
from collections import defaultdict
from collections.abc import Callable, Iterable

import structlog

from ..config.model import AccessConfig, ConfigError

log = structlog.get_logger("forwarder.access")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str], key: str) -> list[Network]:
    """Addresses, CIDR networks and host names (resolved now, at load) to networks."""
    nets: list[Network] = []
    for e in entries:
        try:
            nets.append(ipaddress.ip_network(e, strict=False))
            continue
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(e, None, type=socket.SOCK_STREAM)
        except socket.gaierror as ex:
            raise ConfigError(f"cannot resolve host name {e!r}: {ex.strerror}", key=key) from None
        for info in infos:
            nets.append(ipaddress.ip_network(str(info[4][0]).split("%", 1)[0]))
    return nets


def _best(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: list[Network]) -> int:
    """Longest matching prefix length, -1 when none matches."""
    best = -1
    for n in nets:
        if ip.version == n.version and ip in n and n.prefixlen > best:
            best = n.prefixlen
    return best


class Access:
    """Owns the per-listener admission counters."""

    def __init__(self, cfg: AccessConfig, now: Callable[[], float],
                 hold: Callable[[str, float], None]) -> None:
        self.cfg = cfg
        self.only_from = parse_networks(cfg.only_from, "access.only_from")
        self.no_access = parse_networks(cfg.no_access, "access.no_access")
        self.active = 0
        self.per_source: defaultdict[str, int] = defaultdict(int)
        self._now = now
        self._hold = hold
        self._window = 0.0
        self._count = 0
        self.trivial = cfg == AccessConfig()

    def admit(self, host: str) -> str | None:
        """None to admit (and count) the connection, else the refusal outcome."""
        cfg = self.cfg
        if self.only_from or self.no_access:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            allow = _best(ip, self.only_from) if self.only_from else 0
            deny = _best(ip, self.no_access)
            if allow < 0 or deny >= allow:
                return "refused_acl"
        if cfg.cps is not None:
            now = self._now()
            if now - self._window >= 1.0:
                self._window = now
                self._count = 0
            self._count += 1
            if self._count > cfg.cps.rate:
                self._count = 0
                self._hold("cps", cfg.cps.pause)
                return "rate_limited"
        if cfg.instances is not None and self.active >= cfg.instances:
            return "rate_limited"
        if cfg.per_source is not None and self.per_source[host] >= cfg.per_source:
            return "rate_limited"
        self.active += 1
        self.per_source[host] += 1
        return None

    def count(self, host: str) -> None:
        """A connection admitted before this Access existed (a reload that added limits)."""
        self.active += 1
        self.per_source[host] += 1

    def release(self, host: str) -> None:
        self.active = max(0, self.active - 1)
        n = self.per_source.get(host, 0) - 1
        if n <= 0:
            self.per_source.pop(host, None)
        else:
            self.per_source[host] = n
