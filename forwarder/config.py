"""Typed, validated configuration.

The config is inert data: `load_toml()` / `from_cli()` build it, everything else only reads
it.  Every validation error names the file, the line (when the source has lines) and the
dotted key, because the person reading it is an operator at 3 a.m. with a mail queue growing.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal

Mode = Literal["smtp", "tcp"]
ProbeKind = Literal["tcp", "smtp"]
GatePolicy = Literal["local", "any"]
ProxyVersion = Literal["v1", "v2"]
RelayKind = Literal["auto", "protocol", "splice"]


class ConfigError(Exception):
    """A bad configuration, with enough context to find and fix it."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 key: str | None = None) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where += f":{self.line}"
        if self.key:
            return f"{where}: {self.key}: {self.message}"
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class Endpoint:
    """A host (name, IPv4 or IPv6 literal) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ProbeConfig:
    kind: ProbeKind = "tcp"
    interval: float = 2.0
    # While a rise/fall is pending, probe this often (HAProxy's fastinter): a state change
    # is confirmed in a fraction of a second instead of `rise` full intervals.
    fast_interval: float = 0.25
    timeout: float = 2.0
    rise: int = 2
    fall: int = 2
    jitter: float = 0.1


@dataclass(frozen=True)
class BackendConfig:
    endpoint: Endpoint
    priority: int = 0
    # The local backend decides the gate under policy "local"; the first backend is local
    # unless one is marked explicitly.
    local: bool = False
    probe: ProbeConfig | None = None  # None: the listener's probe

    @property
    def name(self) -> str:
        return str(self.endpoint)


@dataclass(frozen=True)
class DiscoveryConfig:
    """Peers found in DNS: the MX hosts of a domain, or the targets of an SRV name."""

    mx: str | None = None
    srv: str | None = None
    port: int = 8025
    ttl_min: float = 30.0
    ttl_max: float = 3600.0
    timeout: float = 5.0
    nameservers: tuple[str, ...] = ()
    resolv_conf: str | None = None
    exclude: tuple[str, ...] = ()  # extra names/addresses to treat as "this host"
    priority_offset: int = 100  # discovered peers rank after static backends


@dataclass(frozen=True)
class Cps:
    rate: int
    pause: float


@dataclass(frozen=True)
class AccessConfig:
    only_from: tuple[str, ...] = ()
    no_access: tuple[str, ...] = ()
    instances: int | None = None
    per_source: int | None = None
    cps: Cps | None = None


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    addresses: tuple[str, ...]
    port: int
    backends: tuple[BackendConfig, ...]
    mode: Mode = "smtp"
    backlog: int = 511
    gate: GatePolicy = "local"
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    connect_timeout: float = 5.0
    idle_timeout: float = 600.0
    greeting_timeout: float = 10.0
    send_proxy: ProxyVersion | None = None
    hostname: str | None = None  # for the 421 text; default: this host's FQDN
    discovery: DiscoveryConfig | None = None
    access: AccessConfig = field(default_factory=AccessConfig)
    reuse_port: bool = False
    nodelay: bool = True
    keepalive: bool = False
    relay: RelayKind = "auto"

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(Endpoint(a, self.port) for a in self.addresses)


@dataclass(frozen=True)
class LogConfig:
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True)
class Config:
    listeners: tuple[ListenerConfig, ...]
    user: str | None = None  # None: "nobody" when started as root, else stay as we are
    group: str | None = None
    drain_timeout: float = 30.0
    admin: Endpoint | None = None
    log: LogConfig = field(default_factory=LogConfig)
    source: str = "<cli>"


# ---------------------------------------------------------------------------------------
# parsing helpers


_ADDR_RE = re.compile(r"^\[(?P<v6>[^\]]+)\]:(?P<p1>\d+)$|^(?P<host>[^:\[\]]+):(?P<p2>\d+)$")
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.?)+$")


def check_port(value: Any, key: str, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"port must be an integer, got {value!r}", key=key)
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise ConfigError(f"port must be in {low}..65535, got {value}", key=key)
    return value


def check_host(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"address must be a non-empty string, got {value!r}", key=key)
    host = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if _HOSTNAME_RE.match(host) and not host.replace(".", "").isdigit():
        return host
    raise ConfigError(f"not an IP address or host name: {value!r}", key=key)


def parse_endpoint(value: Any, key: str) -> Endpoint:
    """Parse "host:port" or "[v6]:port"."""
    if not isinstance(value, str):
        raise ConfigError(f"expected \"HOST:PORT\", got {value!r}", key=key)
    m = _ADDR_RE.match(value.strip())
    if not m:
        raise ConfigError(f"expected \"HOST:PORT\" or \"[IPv6]:PORT\", got {value!r}", key=key)
    host = m.group("v6") or m.group("host")
    port = int(m.group("p1") or m.group("p2"))
    return Endpoint(check_host(host, key), check_port(port, key))


def check_network(value: Any, key: str) -> str:
    """Validate an access-list entry: an address, a CIDR network or a host name."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"expected an address, network or host name, got {value!r}", key=key)
    v = value.strip()
    try:
        ipaddress.ip_network(v, strict=False)
        return v
    except ValueError:
        pass
    check_host(v, key)
    return v


class _Reader:
    """Walks a TOML table, checking types and rejecting unknown keys with file/line/key."""

    def __init__(self, data: dict[str, Any], path: str, lines: dict[str, int], file: str) -> None:
        self.data = data
        self.path = path
        self.lines = lines
        self.file = file
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str | None, message: str) -> ConfigError:
        key = self.key(name) if name else self.path
        return ConfigError(message, file=self.file, line=self.line_of(key), key=key or None)

    def line_of(self, key: str) -> int | None:
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key.rpartition(".")[0]
        return None

    def sub(self, name: str, value: dict[str, Any]) -> _Reader:
        return _Reader(value, self.key(name), self.lines, self.file)

    def get(self, name: str, types: type | tuple[type, ...], default: Any = None) -> Any:
        self.seen.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in
                                                (types if isinstance(types, tuple) else (types,)))
        if not ok:
            tn = (types.__name__ if isinstance(types, type)
                  else " or ".join(t.__name__ for t in types))
            raise self.error(name, f"expected {tn}, got {type(value).__name__} {value!r}")
        return value

    def number(self, name: str, default: float, *, positive: bool = True,
               allow_zero: bool = False) -> float:
        v = self.get(name, (int, float), default)
        v = float(v)
        if v != v or v in (float("inf"), float("-inf")):
            raise self.error(name, f"must be a finite number, got {v}")
        if positive and (v < 0 or (v == 0 and not allow_zero)):
            raise self.error(name, f"must be {'>= 0' if allow_zero else '> 0'}, got {v:g}")
        return v

    def integer(self, name: str, default: int | None, *, minimum: int = 1) -> int | None:
        v = self.get(name, int, default)
        if v is not None and v < minimum:
            raise self.error(name, f"must be >= {minimum}, got {v}")
        return v  # type: ignore[no-any-return]

    def choice(self, name: str, choices: tuple[str, ...], default: str | None) -> Any:
        v = self.get(name, str, default)
        if v is not None and v not in choices:
            raise self.error(name, f"must be one of {', '.join(choices)}; got {v!r}")
        return v

    def wrap(self, name: str, fn: Any, *args: Any) -> Any:
        """Run a value checker and re-raise its error with this reader's file/line/key."""
        try:
            return fn(*args)
        except ConfigError as e:
            raise self.error(name, e.message) from None

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            name = unknown[0]
            raise self.error(name, f"unknown key (known: {', '.join(sorted(self.seen))})")


def _key_lines(text: str) -> dict[str, int]:
    """Map dotted key paths ("listener.0.port") to their line numbers.

    tomllib reports no positions for valid documents, so we scan the text: table headers,
    arrays of tables and `key =` lines.  Good enough to point at the right line, which is all
    an error message needs.
    """
    lines: dict[str, int] = {}
    counters: dict[str, int] = {}
    prefix = ""
    for no, raw in enumerate(text.splitlines(), 1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        if s.startswith("[["):
            name = s[2:].split("]]", 1)[0].strip()
            parent = _resolve(name.rpartition(".")[0], counters)
            full = f"{parent}.{name.rpartition('.')[2]}" if parent else name
            idx = counters.get(full, -1) + 1
            counters[full] = idx
            prefix = f"{full}.{idx}"
            lines.setdefault(full, no)
            lines[prefix] = no
        elif s.startswith("["):
            name = s[1:].split("]", 1)[0].strip()
            prefix = _resolve(name, counters)
            lines[prefix] = no
        else:
            m = re.match(r'^([A-Za-z0-9_\-."]+)\s*=', s)
            if m:
                key = m.group(1).replace('"', "").strip()
                lines[f"{prefix}.{key}" if prefix else key] = no
    return lines


def _resolve(name: str, counters: dict[str, int]) -> str:
    """Expand a dotted table name so array-of-table parts carry their current index."""
    out = ""
    for part in name.split(".") if name else []:
        out = f"{out}.{part}" if out else part
        if out in counters:
            out = f"{out}.{counters[out]}"
    return out


# ---------------------------------------------------------------------------------------
# TOML


def load_toml(path: str | Path) -> Config:
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", file=file) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8: {e}", file=file) from None
    return parse_toml(text, file)


def parse_toml(text: str, file: str = "<string>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        raise ConfigError(f"TOML syntax error: {e}", file=file,
                          line=int(m.group(1)) if m else None) from None
    return _config_from_dict(data, _key_lines(text), file)


def _config_from_dict(data: dict[str, Any], lines: dict[str, int], file: str) -> Config:
    r = _Reader(data, "", lines, file)
    user = r.get("user", str)
    group = r.get("group", str)
    drain = r.number("drain_timeout", 30.0, allow_zero=True)
    admin_s = r.get("admin", str)
    admin = r.wrap("admin", parse_endpoint, admin_s, "admin") if admin_s else None
    log = LogConfig()
    log_t = r.get("log", dict)
    if log_t is not None:
        lr = r.sub("log", log_t)
        log = LogConfig(format=lr.choice("format", ("auto", "json", "console"), "auto"),
                        level=lr.choice("level", ("debug", "info", "warning", "error"), "info"))
        lr.done()
    defaults = r.get("defaults", dict) or {}
    raw = r.get("listener", list)
    if not raw:
        raise r.error("listener", "at least one [[listener]] table is required")
    listeners = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise r.error("listener", "must be an array of tables ([[listener]])")
        merged = {**defaults, **item}
        listeners.append(_listener(r.sub(f"listener.{i}", merged), i))
    r.done()
    _check_unique_binds(listeners, r)
    return Config(listeners=tuple(listeners), user=user, group=group, drain_timeout=drain,
                  admin=admin, log=log, source=file)


def _check_unique_binds(listeners: list[ListenerConfig], r: _Reader) -> None:
    seen: dict[tuple[str, int], str] = {}
    for i, lc in enumerate(listeners):
        for ep in lc.endpoints:
            k = (ep.host, ep.port)
            if k in seen:
                raise r.error(f"listener.{i}.addresses",
                              f"{ep} is already used by listener {seen[k]!r}")
            seen[k] = lc.name


def _probe(r: _Reader, base: ProbeConfig) -> ProbeConfig:
    p = ProbeConfig(
        kind=r.choice("kind", ("tcp", "smtp"), base.kind),
        interval=r.number("interval", base.interval),
        fast_interval=r.number("fast_interval", base.fast_interval),
        timeout=r.number("timeout", base.timeout),
        rise=r.integer("rise", base.rise) or base.rise,
        fall=r.integer("fall", base.fall) or base.fall,
        jitter=r.number("jitter", base.jitter, allow_zero=True),
    )
    if p.jitter >= 1:
        raise r.error("jitter", f"is a fraction of the interval and must be < 1, got {p.jitter}")
    r.done()
    return p


def _listener(r: _Reader, index: int) -> ListenerConfig:
    name = r.get("name", str, f"listener{index}")
    mode = r.choice("mode", ("smtp", "tcp"), "smtp")
    addrs = r.get("addresses", list)
    single = r.get("address", str)
    if addrs is None and single is None:
        raise r.error("addresses", "missing: give address = \"127.0.0.1\" or addresses = [...]")
    if addrs is not None and single is not None:
        raise r.error("address", "give either address or addresses, not both")
    alist = addrs if addrs is not None else [single]
    if not alist:
        raise r.error("addresses", "must not be empty")
    addresses = tuple(r.wrap("addresses", check_host, a, "addresses") for a in alist)
    port_v = r.get("port", int)
    if port_v is None:
        raise r.error("port", "missing: the port to listen on")
    port = r.wrap("port", check_port, port_v, "port")

    default_kind: ProbeKind = "smtp" if mode == "smtp" else "tcp"
    probe_t = r.get("probe", dict)
    probe = _probe(r.sub("probe", probe_t or {}), ProbeConfig(kind=default_kind))

    backends = _backends(r, probe)
    disc_t = r.get("discovery", dict)
    discovery = _discovery(r.sub("discovery", disc_t)) if disc_t is not None else None
    if not backends and discovery is None:
        raise r.error("backend", "missing: give backend = \"HOST:PORT\" or [[listener.backends]]")

    acc_t = r.get("access", dict)
    access = _access(r.sub("access", acc_t)) if acc_t is not None else AccessConfig()
    gate = r.choice("gate", ("local", "any"), "local")
    if gate == "local" and not backends:
        raise r.error("gate", "gate = \"local\" needs a local backend (backend = ...); with "
                              "only discovered peers use gate = \"any\"")
    lc = ListenerConfig(
        name=name, addresses=addresses, port=port, backends=tuple(backends), mode=mode,
        backlog=r.integer("backlog", 511) or 511, gate=gate, probe=probe,
        connect_timeout=r.number("connect_timeout", 5.0),
        idle_timeout=r.number("idle_timeout", 600.0),
        greeting_timeout=r.number("greeting_timeout", 10.0),
        send_proxy=r.choice("send_proxy", ("v1", "v2"), None),
        hostname=r.get("hostname", str), discovery=discovery, access=access,
        reuse_port=r.get("reuse_port", bool, False), nodelay=r.get("nodelay", bool, True),
        keepalive=r.get("keepalive", bool, False),
        relay=r.choice("relay", ("auto", "protocol", "splice"), "auto"),
    )
    r.done()
    return lc


def _backends(r: _Reader, probe: ProbeConfig) -> list[BackendConfig]:
    out: list[BackendConfig] = []
    single = r.get("backend", str)
    if single is not None:
        out.append(BackendConfig(r.wrap("backend", parse_endpoint, single, "backend"),
                                 local=True))
    items = r.get("backends", list) or []
    for i, item in enumerate(items):
        key = f"backends.{i}"
        if isinstance(item, str):
            out.append(BackendConfig(r.wrap(key, parse_endpoint, item, key), priority=i))
            continue
        if not isinstance(item, dict):
            raise r.error(key, "expected \"HOST:PORT\" or a table")
        br = r.sub(key, item)
        addr = br.get("address", str)
        if addr is None:
            raise br.error("address", "missing: the backend's \"HOST:PORT\"")
        ep = br.wrap("address", parse_endpoint, addr, "address")
        prio = br.integer("priority", i, minimum=0)
        local = br.get("local", bool, False)
        ptab = br.get("probe", dict)
        bprobe = _probe(br.sub("probe", ptab), probe) if ptab is not None else None
        br.done()
        out.append(BackendConfig(ep, priority=prio or 0, local=local, probe=bprobe))
    if single is not None and items:
        # the single backend is the local one and ranks first
        out = [out[0], *(replace(b, priority=b.priority + 1) for b in out[1:])]
    if out and not any(b.local for b in out):
        out[0] = replace(out[0], local=True)
    if sum(b.local for b in out) > 1:
        raise r.error("backends", "only one backend can be local = true")
    out.sort(key=lambda b: (not b.local, b.priority))
    return out


def _discovery(r: _Reader) -> DiscoveryConfig:
    mx = r.get("mx", str)
    srv = r.get("srv", str)
    if (mx is None) == (srv is None):
        raise r.error("mx", "give exactly one of mx = \"DOMAIN\" or srv = \"_NAME._tcp.DOMAIN\"")
    ns = r.get("nameservers", list, [])
    for i, n in enumerate(ns):
        key = f"nameservers.{i}"
        if not isinstance(n, str):
            raise r.error(key, f"expected an IP address, got {n!r}")
        try:
            ipaddress.ip_address(n)
        except ValueError:
            try:  # "IP:PORT" or "[V6]:PORT": a DNS server on another port
                ep = parse_endpoint(n, key)
                ipaddress.ip_address(ep.host)
            except (ConfigError, ValueError):
                raise r.error(key, f"expected an IP address or IP:PORT, got {n!r}") from None
    exclude = r.get("exclude", list, [])
    d = DiscoveryConfig(
        mx=mx, srv=srv, port=r.wrap("port", check_port, r.get("port", int, 8025), "port"),
        ttl_min=r.number("ttl_min", 30.0), ttl_max=r.number("ttl_max", 3600.0),
        timeout=r.number("timeout", 5.0), nameservers=tuple(ns),
        resolv_conf=r.get("resolv_conf", str),
        exclude=tuple(str(x) for x in exclude),
        priority_offset=r.integer("priority_offset", 100, minimum=0) or 0,
    )
    if d.ttl_min > d.ttl_max:
        raise r.error("ttl_min", f"must be <= ttl_max ({d.ttl_max:g}), got {d.ttl_min:g}")
    r.done()
    return d


def _access(r: _Reader) -> AccessConfig:
    def nets(name: str) -> tuple[str, ...]:
        v = r.get(name, list, [])
        return tuple(r.wrap(f"{name}.{i}", check_network, x, name) for i, x in enumerate(v))

    cps_v = r.get("cps", list)
    cps = None
    if cps_v is not None:
        if (len(cps_v) != 2 or not all(isinstance(x, int | float) and not isinstance(x, bool)
                                       for x in cps_v) or cps_v[0] < 1 or cps_v[1] <= 0):
            raise r.error("cps", f"expected [RATE >= 1, PAUSE_SECONDS > 0], got {cps_v!r}")
        cps = Cps(int(cps_v[0]), float(cps_v[1]))
    a = AccessConfig(only_from=nets("only_from"), no_access=nets("no_access"),
                     instances=r.integer("instances", None),
                     per_source=r.integer("per_source", None), cps=cps)
    r.done()
    return a


# ---------------------------------------------------------------------------------------
# CLI one-liner


def from_cli(listen: str, backends: list[str], *, probe: ProbeKind | None = None,
             mode: Mode | None = None, user: str | None = None, group: str | None = None,
             admin: str | None = None, interval: float | None = None,
             relay: RelayKind | None = None) -> Config:
    """Build a config from `--listen/--backend` flags; errors name the flag."""
    lep = _flag(parse_endpoint, listen, "--listen")
    if not backends:
        raise ConfigError("missing: at least one --backend HOST:PORT", key="--backend")
    beps = [_flag(parse_endpoint, b, "--backend") for b in backends]
    if mode is None:
        mode = "smtp" if probe == "smtp" or lep.port == 25 else "tcp"
    kind: ProbeKind = probe or ("smtp" if mode == "smtp" else "tcp")
    pc = ProbeConfig(kind=kind)
    if interval is not None:
        if interval <= 0:
            raise ConfigError(f"must be > 0, got {interval}", key="--interval")
        pc = replace(pc, interval=interval)
    lc = ListenerConfig(
        name="default", addresses=(lep.host,), port=lep.port,
        backends=tuple(BackendConfig(ep, priority=i, local=i == 0) for i, ep in enumerate(beps)),
        mode=mode, probe=pc, gate="local", relay=relay or "auto")
    return Config(listeners=(lc,), user=user, group=group,
                  admin=_flag(parse_endpoint, admin, "--admin") if admin else None)


def _flag(fn: Any, value: str, flag: str) -> Any:
    try:
        return fn(value, flag)
    except ConfigError as e:
        raise ConfigError(e.message, key=flag) from None


# ---------------------------------------------------------------------------------------
# printing the effective config


def to_dict(obj: Any) -> Any:
    """Plain data for printing the effective config (check-config, /status)."""
    if isinstance(obj, Endpoint):
        return str(obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)
                if getattr(obj, f.name) is not None}
    if isinstance(obj, tuple | list):
        return [to_dict(x) for x in obj]
    return obj


def to_toml(cfg: Config) -> str:
    """Render a Config back to TOML that `parse_toml` reads to the same Config."""
    out: list[str] = []
    if cfg.user:
        out.append(f"user = {_tv(cfg.user)}")
    if cfg.group:
        out.append(f"group = {_tv(cfg.group)}")
    out.append(f"drain_timeout = {_tv(cfg.drain_timeout)}")
    if cfg.admin:
        out.append(f"admin = {_tv(str(cfg.admin))}")
    out += ["", "[log]", f"format = {_tv(cfg.log.format)}", f"level = {_tv(cfg.log.level)}"]
    for lc in cfg.listeners:
        out += ["", "[[listener]]"]
        for k in ("name", "addresses", "port", "mode", "backlog", "gate", "connect_timeout",
                  "idle_timeout", "greeting_timeout", "send_proxy", "hostname", "reuse_port",
                  "nodelay", "keepalive", "relay"):
            v = getattr(lc, k)
            if v is not None:
                out.append(f"{k} = {_tv(v)}")
        out += ["[listener.probe]"]
        out += [f"{k} = {_tv(v)}" for k, v in to_dict(lc.probe).items()]
        a = lc.access
        if a != AccessConfig():
            out.append("[listener.access]")
            for k in ("only_from", "no_access", "instances", "per_source"):
                v = getattr(a, k)
                if v:
                    out.append(f"{k} = {_tv(v)}")
            if a.cps:
                out.append(f"cps = [{a.cps.rate}, {_tv(a.cps.pause)}]")
        if lc.discovery:
            out.append("[listener.discovery]")
            out += [f"{k} = {_tv(v)}" for k, v in to_dict(lc.discovery).items()]
        for b in lc.backends:
            out += ["[[listener.backends]]", f"address = {_tv(str(b.endpoint))}",
                    f"priority = {b.priority}", f"local = {_tv(b.local)}"]
            if b.probe:
                out.append("[listener.backends.probe]")
                out += [f"{k} = {_tv(v)}" for k, v in to_dict(b.probe).items()]
    return "\n".join(out) + "\n"


def _tv(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, tuple | list):
        return "[" + ", ".join(_tv(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'
