"""Typed, validated configuration.

The config is inert data: `load_toml()` / `from_cli()` build it, everything else only reads
it.  Every validation error names the file, the line (when the source has lines) and the
dotted key, because the person reading it is an operator at 3 a.m. with a mail queue growing.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field, fields
from typing import Any, Literal

Mode = Literal["smtp", "tcp"]
ProbeKind = Literal["tcp", "smtp", "http", "exec", "agent"]
Degraded = Literal["up", "drain"]
GatePolicy = Literal["local", "any"]
ProxyVersion = Literal["v1", "v2"]
RelayKind = Literal["auto", "splice", "core", "python"]
SockAddr = tuple[socket.AddressFamily, tuple[Any, ...]]
# a field computed by the load step (config/load.py), not written by the user
DERIVED = {"derived": True}


def printable(text: str) -> str:
    """`text` for a message: non-printable characters escaped as repr() does (\\x1b, \\x00,
    \\u2028), so file content or a file name can never move the cursor or ring the
    terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


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
        where = printable(self.file or "<config>")
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
class CheckConfig:
    """One health check of a backend.  Only the fields of its `kind` apply."""

    kind: ProbeKind = "tcp"
    name: str = ""  # the `check` label and the name in /status; default: the kind
    timeout: float = 2.0
    # smtp: after the 220 greeting, optionally EHLO, MAIL FROM, RCPT TO (each must get its
    # 2xx), then RSET and QUIT.  None: the step is not sent.
    ehlo: str | None = None
    mail_from: str | None = None  # "" sends MAIL FROM:<> (a bounce address)
    rcpt_to: str | None = None
    # http: GET `url` (any host and port, not only the backend's); up on a 2xx, or on one
    # of `expect_status`; a James-style JSON body {"status": "degraded"} counts as
    # `degraded` says: up, or drain (no new connections, live ones finish)
    url: str | None = None
    expect_status: tuple[int, ...] = ()
    degraded: Degraded = "up"
    # exec: argv; exit 0 is up
    command: tuple[str, ...] = ()
    # agent: a TCP port on the backend's host answering one line (up/down/drain/maint)
    port: int | None = None

    @property
    def label(self) -> str:
        return self.name or self.kind


@dataclass(frozen=True)
class ProbeConfig(CheckConfig):
    """How a backend is probed: the schedule and rise/fall, the first check (the inherited
    fields), and any further `checks`; a probe round passes only when every check does."""

    interval: float = 2.0
    # While a rise/fall is pending, probe this often (HAProxy's fastinter): a state change
    # is confirmed in a fraction of a second instead of `rise` full intervals.
    fast_interval: float = 0.25
    rise: int = 2
    fall: int = 2
    jitter: float = 0.1
    checks: tuple[CheckConfig, ...] = ()

    @property
    def all_checks(self) -> tuple[CheckConfig, ...]:
        first = CheckConfig(**{f.name: getattr(self, f.name) for f in fields(CheckConfig)})
        return (first, *self.checks)


CHECK_FIELDS = tuple(f.name for f in fields(CheckConfig))


@dataclass(frozen=True)
class BackendConfig:
    endpoint: Endpoint
    priority: int = 0
    # The local backend decides the gate under policy "local"; the first backend is local
    # unless one is marked explicitly.
    local: bool = False
    probe: ProbeConfig | None = None  # None: the listener's probe
    sockaddr: SockAddr | None = field(default=None, compare=False, repr=False,
                                      metadata=DERIVED)
    key: str = field(default="", compare=False, repr=False, metadata=DERIVED)  # as written

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


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AccessConfig:
    only_from: tuple[str, ...] = ()
    no_access: tuple[str, ...] = ()
    instances: int | None = None
    per_source: int | None = None
    cps: Cps | None = None
    # the entries as networks, host names resolved by the load step
    only_from_nets: tuple[Network, ...] = field(default=(), compare=False, repr=False,
                                                metadata=DERIVED)
    no_access_nets: tuple[Network, ...] = field(default=(), compare=False, repr=False,
                                                metadata=DERIVED)


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
    greeting_timeout: float | Literal["auto"] = "auto"  # see health/greeting.py
    greeting_timeout_max: float = 10.0
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
    # where an operator's drain is kept across restarts; None: $STATE_DIRECTORY/state.json
    # under systemd (StateDirectory=), else nowhere
    state_file: str | None = None
    # worker processes accepting and relaying ("auto": one per CPU; 1: this process does
    # it all); see workers/hub.py
    workers: int | Literal["auto"] = 1
    dashboard_url: str | None = None  # linked from the status page
    source: str = "<cli>"
    # where each key was written, for errors found after reading (see `Place`)
    places: Place | None = field(default=None, compare=False, repr=False, metadata=DERIVED)
    warnings: tuple[str, ...] = field(default=(), compare=False, repr=False, metadata=DERIVED)


class Place:
    """Names a listener's key the way its source wrote it, with the line: the TOML reader
    knows lines and whether `address` or `addresses` was used; xinetd names the service;
    the one-liner names the flag.  The default names the dotted TOML key without a line."""

    def __init__(self, file: str | None = None) -> None:
        self.file = file

    def key(self, index: int | None, name: str) -> tuple[str, int | None]:
        return (f"listener.{index}.{name}" if index is not None else name), None

    def error(self, index: int | None, name: str, message: str) -> ConfigError:
        key, line = self.key(index, name)
        return ConfigError(message, file=self.file, line=line, key=key)

    def warning(self, index: int | None, name: str, message: str) -> str:
        return str(self.error(index, name, message))


# ---------------------------------------------------------------------------------------
# parsing helpers


_ADDR_RE = re.compile(r"^\[(?P<v6>[^\]]+)\]:(?P<p1>\d+)$|^(?P<host>[^:\[\]]+):(?P<p2>\d+)$")
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.?)+$")


def default_probe_kind(mode: Mode) -> ProbeKind:
    """The probe that proves a backend can serve this mode: a greeting for smtp."""
    return "smtp" if mode == "smtp" else "tcp"


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


