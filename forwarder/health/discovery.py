"""Peer discovery from DNS: the MX hosts of a domain, or the targets of an SRV name.

One task per listener re-resolves the name when the answer's TTL runs out (clamped to
[ttl_min, ttl_max]) and hands the peers to the pool as source "dns"; the pool keeps the
health state of peers that stay.  Every lookup goes through dnspython's own resolver (the
configured nameservers, a resolv.conf, or the system's), never the libc resolver, so its
timeout is ours and it cannot block the loop.

A failed lookup (timeout, SERVFAIL, NXDOMAIN, no records, a garbled reply) keeps the last
good peers: a DNS outage must not take working peers away.  It is logged, counted and
retried after a short backoff.  This host (its names, its addresses, the listener's own
addresses and static backends, `exclude`) is never added as its own peer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

# Everything dnspython would import lazily on the first lookup is imported here, so that
# cli._preimport() (importing this module before the privilege drop) covers it.
import dns._asyncio_backend
import dns.asyncbackend
import dns.asyncquery
import dns.asyncresolver
import dns.edns
import dns.exception
import dns.flags
import dns.inet
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.CNAME
import dns.rdtypes.ANY.DNAME
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.NS
import dns.rdtypes.ANY.OPT
import dns.rdtypes.ANY.SOA
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rdtypes.IN.SRV
import dns.resolver
import dns.update  # a garbled reply that claims opcode UPDATE makes dnspython import it
import structlog

from ..config.model import BackendConfig, DiscoveryConfig, Endpoint
from ..net.sockets import local_addresses
from ..ops import metrics, supervise
from .backends import sockaddr_of

# ... and every other record type a (garbled) reply could name, with dynamic loading off:
# after the privilege drop an import from the Python installation may fail.
_load_all = getattr(dns.rdata, "load_all_types", None)  # absent from older dnspython
if _load_all is not None:
    _load_all()

log = structlog.get_logger("forwarder.discovery")

# forwarder_dns_lookups_total{result=...}: one count per refresh
RESULTS = ("ok", "partial", "timeout", "servfail", "nxdomain", "noanswer", "failed")
BACKOFF_FIRST = 5.0  # first retry after a failure: min(ttl_min, this), doubling to ttl_min
JITTER = 0.05  # +-5% on every wait, so a fleet does not query in lockstep


class LookupError_(Exception):
    """A lookup that produced no usable answer; `result` is the metrics label."""

    def __init__(self, result: str, detail: str) -> None:
        self.result = result
        self.detail = detail
        super().__init__(detail)


@dataclass(frozen=True)
class Scope:
    """What discovery must know about its listener: who "this host" is, and what is
    already a backend.  Given by the listener (discovery never reads the listener)."""

    hostname: str
    addresses: tuple[str, ...]  # the listener's own listen addresses
    static: tuple[Endpoint, ...]  # the static backends


Apply = Callable[[tuple[BackendConfig, ...]], Awaitable[None]]


@dataclass(frozen=True)
class Peer:
    host: str  # the MX exchange / SRV target, without the trailing dot
    backend: BackendConfig


def parse_nameserver(entry: str) -> dns.nameserver.Do53Nameserver:
    """"ip", "ip:port", "[v6]" or "[v6]:port" -> a dnspython nameserver."""
    s = entry.strip()
    port = 53
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad nameserver {entry!r}")
            port = int(rest[1:])
    elif s.count(":") == 1:
        host, _, p = s.partition(":")
        port = int(p)
    else:
        host = s  # IPv4, or a bare IPv6 literal
    ipaddress.ip_address(host)
    if not 0 < port < 65536:
        raise ValueError(f"bad port in nameserver {entry!r}")
    return dns.nameserver.Do53Nameserver(host, port)


def make_resolver(cfg: DiscoveryConfig) -> dns.asyncresolver.Resolver:
    if cfg.nameservers:
        r = dns.asyncresolver.Resolver(configure=False)
        r.nameservers = [parse_nameserver(n) for n in cfg.nameservers]
    elif cfg.resolv_conf:
        r = dns.asyncresolver.Resolver(filename=cfg.resolv_conf)
    else:
        r = dns.asyncresolver.Resolver()
    r.timeout = cfg.timeout
    r.lifetime = cfg.timeout
    r.cache = None  # every refresh asks: the TTL schedule is ours
    r.search = []
    r.use_search_by_default = False
    return r


def _norm_name(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _norm_addr(addr: str) -> str | None:
    try:
        return str(ipaddress.ip_address(addr.split("%", 1)[0].strip("[]")))
    except ValueError:
        return None


class Discovery:
    """Owns the DNS peers of one listener; hands them to `apply` (the listener's pool)."""

    def __init__(self, name: str, cfg: DiscoveryConfig, scope: Scope, apply: Apply) -> None:
        self.name = name
        self.cfg = cfg
        self.scope = scope
        self._apply = apply
        self._task: asyncio.Task[None] | None = None
        self.peers: tuple[Peer, ...] = ()
        self.applied: tuple[BackendConfig, ...] | None = None
        self.failures = 0  # consecutive
        self.host_addrs: dict[str, list[str]] = {}  # last good addresses per target
        self.own_names: set[str] = set()
        self.own_addrs: set[str] = set()
        self.loop = asyncio.get_running_loop()
        self.lookups = {r: metrics.dns_lookups.labels(self.name, r) for r in RESULTS}
        self.peers_gauge = metrics.dns_peers.labels(self.name)
        self.peers_gauge.set(0)

    def configure(self, cfg: DiscoveryConfig, scope: Scope) -> None:
        """A reload: the next refresh uses the new name, servers and scope."""
        self.cfg, self.scope = cfg, scope

    @property
    def qname(self) -> str:
        return self.cfg.mx or self.cfg.srv or ""

    # --- this host ----------------------------------------------------------------------

    async def learn_self(self) -> None:
        """Names and addresses that are this host (once: they do not move under us)."""
        names = {socket.gethostname(), self.scope.hostname}
        self.own_names = {_norm_name(n) for n in names if n}
        addrs = set(local_addresses())
        for n in names:
            if not n:
                continue
            try:
                async with asyncio.timeout(self.cfg.timeout):
                    infos = await self.loop.getaddrinfo(n, None, type=socket.SOCK_STREAM)
            except (OSError, TimeoutError):
                continue
            addrs.update(str(i[4][0]) for i in infos)
        self.own_addrs = {a for a in (_norm_addr(x) for x in addrs) if a is not None}
        log.debug("dns.self", listener=self.name, names=sorted(self.own_names),
                  addresses=sorted(self.own_addrs))

    def _excluded(self) -> tuple[set[str], set[str], list[ipaddress.IPv4Network |
                                                         ipaddress.IPv6Network]]:
        """(names, addresses, networks) that are this host, with the current config."""
        names = set(self.own_names)
        addrs = set(self.own_addrs)
        nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for ep in self.scope.static:
            a = _norm_addr(ep.host)
            if a is not None:
                addrs.add(a)
            else:
                names.add(_norm_name(ep.host))
        for h in self.scope.addresses:
            a = _norm_addr(h)
            if a is not None and not ipaddress.ip_address(a).is_unspecified:
                addrs.add(a)
        for x in self.cfg.exclude:
            a = _norm_addr(x)
            if a is not None:
                addrs.add(a)
                continue
            try:
                nets.append(ipaddress.ip_network(x.strip(), strict=False))
            except ValueError:
                names.add(_norm_name(x))
        return names, addrs, nets

    # --- lookups ------------------------------------------------------------------------

    async def _query(self, r: dns.asyncresolver.Resolver, name: str,
                     rdtype: dns.rdatatype.RdataType) -> dns.resolver.Answer:
        """One lookup; dnspython's exceptions become LookupError_ with a metrics label."""
        try:
            return await r.resolve(name, rdtype, search=False, lifetime=self.cfg.timeout)
        except dns.resolver.NXDOMAIN:
            raise LookupError_("nxdomain", f"{name} does not exist (NXDOMAIN)") from None
        except dns.resolver.NoAnswer:
            raise LookupError_("noanswer",
                               f"{name} has no {rdtype.name} records") from None
        except dns.exception.Timeout:
            raise LookupError_("timeout", f"no answer within {self.cfg.timeout:g}s") from None
        except dns.resolver.NoNameservers as e:
            kind = "servfail" if "SERVFAIL" in str(e) else "failed"
            raise LookupError_(kind, str(e)) from None
        except dns.exception.DNSException as e:
            raise LookupError_("failed", f"{type(e).__name__}: {e}") from None

    async def _addresses(self, r: dns.asyncresolver.Resolver,
                         host: str) -> tuple[list[str], float | None, str | None]:
        """A and AAAA of one target: (addresses, min ttl, transient error or None).
        A name that does not exist or has no address records is an empty list, not an
        error; a timeout or SERVFAIL is, and the caller falls back to the last good list."""
        if _norm_addr(host) is not None:  # an address where a name belongs: take it
            return [str(_norm_addr(host))], None, None
        out: list[str] = []
        ttl: float | None = None
        error: str | None = None
        results = await asyncio.gather(
            *(self._query(r, host, t) for t in (dns.rdatatype.A, dns.rdatatype.AAAA)),
            return_exceptions=True)
        for res in results:
            if isinstance(res, LookupError_):
                if res.result not in ("nxdomain", "noanswer"):
                    error = f"{res.result}: {res.detail}"
                continue
            if isinstance(res, BaseException):
                raise res
            if res.rrset is None:
                continue
            ttl = res.rrset.ttl if ttl is None else min(ttl, res.rrset.ttl)
            out.extend(str(rd.address) for rd in res.rrset)
        return out, ttl, error

    async def lookup(self) -> tuple[list[Peer], float, list[str]]:
        """Resolve the name: (peers best first, min ttl, per-target errors)."""
        cfg = self.cfg
        r = make_resolver(cfg)
        # (host, port, rank) best first
        targets: list[tuple[str, int, int]] = []
        if cfg.mx:
            ans = await self._query(r, cfg.mx, dns.rdatatype.MX)
            assert ans.rrset is not None
            ttl = float(ans.rrset.ttl)
            mxs = sorted(ans.rrset, key=lambda m: (m.preference, m.exchange.to_text()))
            for m in mxs:
                host = _norm_name(m.exchange.to_text())
                if host:  # "." is a null MX (RFC 7505): no mail here
                    targets.append((host, cfg.port, int(m.preference)))
        else:
            assert cfg.srv
            ans = await self._query(r, cfg.srv, dns.rdatatype.SRV)
            assert ans.rrset is not None
            ttl = float(ans.rrset.ttl)
            srvs = sorted(ans.rrset, key=lambda s: (s.priority, -s.weight, s.target.to_text()))
            for s in srvs:
                host = _norm_name(s.target.to_text())
                if host:  # "." : the service is decidedly not available there
                    targets.append((host, int(s.port), int(s.priority)))

        names, own, nets = self._excluded()
        wanted = [t for t in targets if t[0] not in names]
        hosts = sorted({t[0] for t in wanted})
        resolved = await asyncio.gather(*(self._addresses(r, h) for h in hosts))
        addrs: dict[str, list[str]] = {}
        errors: list[str] = []
        for h, (al, attl, err) in zip(hosts, resolved, strict=True):
            if err is not None and not al:
                errors.append(f"{h}: {err}")
                al = self.host_addrs.get(h, [])  # transient: the last good addresses
            else:
                self.host_addrs[h] = al
                if attl is not None:
                    ttl = min(ttl, attl)
            addrs[h] = al
        static = set(self.scope.static)
        peers: list[Peer] = []
        seen: set[Endpoint] = set()
        for host, port, rank in wanted:
            for a in addrs.get(host, []):
                ip = ipaddress.ip_address(a)
                if a in own or any(ip in n for n in nets):
                    continue
                ep = Endpoint(a, port)
                if ep in static or ep in seen:
                    continue
                seen.add(ep)
                peers.append(Peer(host, BackendConfig(
                    ep, priority=cfg.priority_offset + rank, local=False,
                    sockaddr=sockaddr_of(ep))))
        return peers, ttl, errors

    # --- the loop -----------------------------------------------------------------------

    async def refresh(self) -> float:
        """One lookup and, when the peers changed, one pool update; returns the wait."""
        cfg = self.cfg
        try:
            peers, ttl, errors = await self.lookup()
        except LookupError_ as e:
            self.failures += 1
            self.lookups[e.result].inc()
            wait = min(cfg.ttl_min, BACKOFF_FIRST * (1 << min(self.failures - 1, 20)))
            wait = max(0.05, min(wait, cfg.ttl_max))
            log.warning("dns.failed", listener=self.name, name=self.qname, result=e.result,
                        error=e.detail, failures=self.failures, retry_in=round(wait, 3),
                        kept=[str(p.backend.endpoint) for p in self.peers])
            return wait
        self.failures = 0
        self.lookups["partial" if errors else "ok"].inc()
        if errors:
            log.warning("dns.failed", listener=self.name, name=self.qname, result="partial",
                        error="; ".join(errors), detail="kept the last good addresses")
        await self.apply(peers)
        wait = min(max(ttl, cfg.ttl_min), cfg.ttl_max)
        log.debug("dns.lookup", listener=self.name, name=self.qname, ttl=ttl,
                  next_in=round(wait, 3), peers=len(peers))
        return wait

    async def apply(self, peers: list[Peer]) -> None:
        configs = tuple(p.backend for p in peers)
        if configs == self.applied:
            return
        before = {b.endpoint for b in self.applied or ()}
        after = {b.endpoint for b in configs}
        await self._apply(configs)
        self.applied = configs
        self.peers = tuple(peers)
        self.peers_gauge.set(len(peers))
        log.info("dns.peers", listener=self.name, name=self.qname,
                 peers=[{"backend": str(p.backend.endpoint), "host": p.host,
                         "priority": p.backend.priority} for p in peers],
                 added=sorted(map(str, after - before)),
                 removed=sorted(map(str, before - after)))

    async def run(self) -> None:
        await self.learn_self()
        while True:
            try:
                wait = await self.refresh()
            except Exception:  # a bug here must not end discovery for good
                supervise.internal_error("discovery", "dns.error", listener=self.name,
                                         name=self.qname)
                self.lookups["failed"].inc()
                wait = max(0.05, min(self.cfg.ttl_min, BACKOFF_FIRST))
            await asyncio.sleep(wait * (1 + random.uniform(-JITTER, JITTER)))

    def start(self) -> None:
        if self._task is None:
            self._task = supervise.spawn("discovery", self.run, name=self.name)

    async def stop(self) -> None:
        """Stop re-resolving; the peers stay in the pool until the owner removes them."""
        await supervise.cancel(self._task)
        self._task = None
        self.peers_gauge.set(0)
