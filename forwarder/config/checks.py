"""The rules every config obeys, whatever wrote it (TOML, xinetd files, the one-liner).

Each reader builds a Config and calls `validate()`; the errors name the place through the
Config's `Place`, so a TOML user reads `forwarder.toml:6: listener.0.address: ...`, an
xinetd user `smtp:3: service smtp: bind: ...` and a one-liner user `--listen: ...`.

Why these rules: each one is a configuration that starts without complaint and then fails
in a way an operator only finds under traffic.  Two listeners on overlapping addresses (or
the admin endpoint on a listener's address): the second bind takes the port from the first
gate while it is closed.  Two listeners with one name: only one of them can be drained,
shown or counted.  A local gate without a local backend never opens.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import replace

from .model import Config, ConfigError, Endpoint, Place, ProbeConfig


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def overlaps(a: Endpoint, b: Endpoint) -> bool:
    """Would binding both fail (or, with SO_REUSEADDR, let one steal the other's port)?
    Same port and the same address, or a wildcard of the same family (our IPv6 sockets are
    v6-only, so "::" does not cover IPv4)."""
    if a.port != b.port:
        return False
    ia, ib = _ip(a.host), _ip(b.host)
    if ia is None or ib is None:  # a host name: only the same name is known to clash
        return a.host.lower() == b.host.lower()
    if ia.version != ib.version:
        return False
    return ia == ib or ia.is_unspecified or ib.is_unspecified


def _probe_warnings(p: ProbeConfig, place: Place, index: int, key: str) -> list[str]:
    if p.timeout > p.interval:
        return [place.warning(index, f"{key}.timeout",
                              f"{p.timeout:g}s is longer than the interval ({p.interval:g}s): "
                              "a probe may take longer than the pause between two")]
    return []


def validate(cfg: Config) -> Config:
    """Raise ConfigError for the first broken rule; return cfg with its warnings."""
    place = cfg.places or Place(cfg.source)
    warnings: list[str] = []
    names: dict[str, int] = {}
    binds: list[tuple[Endpoint, str]] = []
    for i, lc in enumerate(cfg.listeners):
        if lc.name in names:
            raise place.error(i, "name", f"duplicate listener name {lc.name!r} (listener "
                                         f"{names[lc.name]} has it too): names must be unique")
        names[lc.name] = i
        if lc.gate == "local" and not any(b.local for b in lc.backends):
            raise place.error(i, "gate", "gate = \"local\" needs a local backend (backend = "
                                         "...); with only discovered peers use gate = \"any\"")
        warnings += _probe_warnings(lc.probe, place, i, "probe")
        for b in lc.backends:
            if b.probe is not None:
                warnings += _probe_warnings(b.probe, place, i, "backends.probe")
        for ep in lc.endpoints:
            for other, owner in binds:
                if overlaps(ep, other):
                    whose = ("this listener" if owner == lc.name
                             else f"listener {owner!r}")
                    what = (f"is already used by {whose}" if ep == other
                            else f"overlaps {other} of {whose}")
                    raise place.error(i, "addresses", f"{ep} {what}: one socket would take "
                                                      "the other's port")
            binds.append((ep, lc.name))
    if isinstance(cfg.workers, int) and cfg.workers > 1 and limited(cfg):
        raise place.error(None, "workers", f"listener {limited(cfg)[0]!r} has instances, "
                          "per_source or cps limits, which one process must count: "
                          "use workers = 1")
    if cfg.admin is not None:
        for ep, owner in binds:
            if overlaps(cfg.admin, ep):
                raise place.error(None, "admin", f"{cfg.admin} overlaps {ep} of listener "
                                                 f"{owner!r}: give the admin endpoint its own "
                                                 "port")
    return replace(cfg, warnings=tuple(warnings))


def limited(cfg: Config) -> list[str]:
    """Listeners with xinetd's connection limits, which one process must count."""
    return [lc.name for lc in cfg.listeners if lc.access.instances is not None
            or lc.access.per_source is not None or lc.access.cps is not None]


def worker_count(cfg: Config) -> int:
    """Worker processes to run: `workers`, where "auto" is one per CPU this process may
    use, and 1 (no workers) when a listener has limits only one process can count."""
    if cfg.workers != "auto":
        return cfg.workers
    if limited(cfg):
        return 1
    return max(1, len(os.sched_getaffinity(0)))


def is_own_address(sockaddr: tuple[object, ...], listens: list[Endpoint],
                   local: frozenset[str]) -> bool:
    """Is a backend at `sockaddr` one of our own listening addresses?  A wildcard listen
    address covers loopback and every address of this host (`local`)."""
    ip = _ip(str(sockaddr[0]))
    port = sockaddr[1]
    if ip is None:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    for ep in listens:
        lip = _ip(ep.host)
        if ep.port != port or lip is None or lip.version != ip.version:
            continue
        if lip == ip or (lip.is_unspecified and (ip.is_loopback or str(ip) in local)):
            return True
    return False


def check_error(cfg: Config, index: int | None, key: str, message: str) -> ConfigError:
    """An error found after validate() (the load step), named as the source wrote it."""
    return (cfg.places or Place(cfg.source)).error(index, key, message)
