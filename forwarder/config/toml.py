"""The TOML config file: reader (every error names file, line and key) and printer.

tomllib reports no positions for valid documents, so `_key_lines` maps dotted keys to
lines by scanning the text; `_Reader` walks the tables, checks types and rejects unknown
keys.  `to_toml` prints a Config back so that `parse_toml(to_toml(cfg)) == cfg`.

Size: about 470 lines, one reader function per table of the file format and the printer
beside them, so that each key's rule sits next to its siblings and its printed form.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import re
import tomllib
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from .checks import validate
from .load import read_file
from .model import (
    AccessConfig,
    BackendConfig,
    CheckConfig,
    Config,
    ConfigError,
    Cps,
    DiscoveryConfig,
    Endpoint,
    ListenerConfig,
    LogConfig,
    Place,
    ProbeConfig,
    RelayKind,
    check_host,
    check_network,
    check_port,
    default_probe_kind,
    parse_endpoint,
)


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


class _TomlPlace(Place):
    """Keys as the file wrote them (`address` or `addresses`), with their lines."""

    def __init__(self, file: str, lines: dict[str, int]) -> None:
        super().__init__(file)
        self.lines = lines

    def key(self, index: int | None, name: str) -> tuple[str, int | None]:
        key = name if index is None else f"listener.{index}.{name}"
        if name == "addresses" and f"listener.{index}.address" in self.lines:
            key = f"listener.{index}.address"
        line = None
        k = key
        while k and line is None:
            line = self.lines.get(k)
            k = k.rpartition(".")[0]
        return key, line


# ---------------------------------------------------------------------------------------
# TOML


def load_toml(path: str | Path) -> Config:
    """Read and check a TOML file (the load step, config/load.py, resolves names)."""
    file = str(path)
    data = read_file(file)
    try:
        text = data.decode("utf-8")
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
    for k, v in (("user", user), ("group", group)):
        if v is not None and not v.strip():
            raise r.error(k, "must not be empty (leave the key out for the default)")
    drain = r.number("drain_timeout", 30.0, allow_zero=True)
    state_file = r.get("state_file", str)
    dashboard_url = r.get("dashboard_url", str)
    if dashboard_url is not None and (urlsplit(dashboard_url).scheme not in ("http", "https")
                                      or not urlsplit(dashboard_url).hostname):
        raise r.error("dashboard_url", f"expected an http:// or https:// URL, got "
                                       f"{dashboard_url!r}")
    workers = r.get("workers", (int, str), 1)
    if workers != "auto" and (not isinstance(workers, int) or not 1 <= workers <= 256):
        raise r.error("workers", f"expected \"auto\" or a number 1..256, got {workers!r}")
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
    return validate(Config(listeners=tuple(listeners), user=user, group=group,
                           drain_timeout=drain, admin=admin, log=log, source=file,
                           state_file=state_file, workers=workers,
                           dashboard_url=dashboard_url,
                           places=_TomlPlace(file, lines)))


KINDS = ("tcp", "smtp", "http", "exec", "agent")
# the check fields that apply to one kind only; a field given for another kind is a typo
KIND_FIELDS = {"ehlo": "smtp", "mail_from": "smtp", "rcpt_to": "smtp", "url": "http",
               "expect_status": "http", "degraded": "http", "command": "exec",
               "port": "agent"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _smtp_word(r: _Reader, name: str, base: str | None) -> str | None:
    v = r.get(name, str, base)
    if v is not None and (_CONTROL.search(v) or "<" in v or ">" in v):
        raise r.error(name, f"must be a plain address or name, without control characters "
                            f"or angle brackets; got {v!r}")
    return v


def _check(r: _Reader, base: CheckConfig) -> dict[str, Any]:
    """The fields of one check (the probe's first, or one of [[...probe.checks]])."""
    kind = r.choice("kind", KINDS, base.kind)
    for f, only in KIND_FIELDS.items():
        if f in r.data and kind != only:
            raise r.error(f, f"applies to kind = \"{only}\" only (this check is {kind})")
    url = r.get("url", str, base.url)
    if url is not None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise r.error("url", f"expected an http:// or https:// URL with a host, got "
                                 f"{url!r}")
    statuses = r.get("expect_status", list, list(base.expect_status))
    for i, code in enumerate(statuses):
        if isinstance(code, bool) or not isinstance(code, int) or not 100 <= code <= 599:
            raise r.error(f"expect_status.{i}", f"expected an HTTP status 100..599, got "
                                                f"{code!r}")
    command = r.get("command", list, list(base.command))
    if any(not isinstance(c, str) or not c for c in command):
        raise r.error("command", "expected a list of non-empty strings (argv, no shell)")
    port = r.get("port", int, base.port)
    out = dict(kind=kind, name=r.get("name", str, base.name),
               timeout=r.number("timeout", base.timeout),
               ehlo=_smtp_word(r, "ehlo", base.ehlo),
               mail_from=_smtp_word(r, "mail_from", base.mail_from),
               rcpt_to=_smtp_word(r, "rcpt_to", base.rcpt_to), url=url,
               expect_status=tuple(statuses),
               degraded=r.choice("degraded", ("up", "drain"), base.degraded),
               command=tuple(command),
               port=r.wrap("port", check_port, port, "port") if port is not None else None)
    need = {"http": ("url", out["url"]), "exec": ("command", out["command"]),
            "agent": ("port", out["port"])}.get(kind)
    if need is not None and not need[1]:
        raise r.error(need[0], f"missing: kind = \"{kind}\" needs {need[0]}")
    return out


def _probe(r: _Reader, base: ProbeConfig) -> ProbeConfig:
    first = _check(r, base)
    extra = []
    for i, item in enumerate(r.get("checks", list, [])):
        if not isinstance(item, dict):
            raise r.error(f"checks.{i}", "must be a table ([[...probe.checks]])")
        cr = r.sub(f"checks.{i}", item)
        extra.append(CheckConfig(**_check(cr, CheckConfig(timeout=first["timeout"]))))
        cr.done()
    p = ProbeConfig(
        **first,
        interval=r.number("interval", base.interval),
        fast_interval=r.number("fast_interval", base.fast_interval),
        rise=r.integer("rise", base.rise) or base.rise,
        fall=r.integer("fall", base.fall) or base.fall,
        jitter=r.number("jitter", base.jitter, allow_zero=True),
        checks=tuple(extra) if "checks" in r.data else base.checks,
    )
    if p.jitter >= 1:
        raise r.error("jitter", f"is a fraction of the interval and must be < 1, got {p.jitter}")
    labels = [c.label for c in p.all_checks]
    dup = next((x for x in labels if labels.count(x) > 1), None)
    if dup is not None:
        raise r.error("checks", f"two checks are called {dup!r}: give each a distinct name")
    r.done()
    return p


def _relay(r: _Reader) -> RelayKind:
    """auto/splice: the compiled core when it was built, else the Python relay; core:
    insist on the compiled one; python: the pure-Python relay (traffic/core.py)."""
    if r.data.get("relay") == "protocol":
        raise r.error("relay", "the asyncio protocol relay was removed in 0.2 (the splice "
                               "relay was as fast or faster on every benchmark): remove the key")
    kind: RelayKind = r.choice("relay", ("auto", "splice", "core", "python"), "auto")
    if kind == "core" and importlib.util.find_spec("forwarder.traffic._core") is None:
        raise r.error("relay", "the compiled relay core was not built (no C compiler at "
                               "install time?): reinstall with gcc, or use \"auto\"")
    return kind


def _greeting(r: _Reader) -> float | Literal["auto"]:
    v = r.get("greeting_timeout", (int, float, str), "auto")
    if isinstance(v, str):
        if v != "auto":
            raise r.error("greeting_timeout", f"expected \"auto\" or seconds, got {v!r}")
        return "auto"
    return r.number("greeting_timeout", 10.0)


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
    akey = "addresses" if addrs is not None else "address"
    addresses = tuple(r.wrap(akey, check_host, a, akey) for a in alist)
    port_v = r.get("port", int)
    if port_v is None:
        raise r.error("port", "missing: the port to listen on")
    port = r.wrap("port", check_port, port_v, "port")

    probe_t = r.get("probe", dict)
    probe = _probe(r.sub("probe", probe_t or {}), ProbeConfig(kind=default_probe_kind(mode)))

    backends = _backends(r, probe)
    disc_t = r.get("discovery", dict)
    discovery = _discovery(r.sub("discovery", disc_t)) if disc_t is not None else None
    if not backends and discovery is None:
        raise r.error("backend", "missing: give backend = \"HOST:PORT\" or [[listener.backends]]")

    acc_t = r.get("access", dict)
    access = _access(r.sub("access", acc_t)) if acc_t is not None else AccessConfig()
    gate = r.choice("gate", ("local", "any"), "local")
    lc = ListenerConfig(
        name=name, addresses=addresses, port=port, backends=tuple(backends), mode=mode,
        backlog=r.integer("backlog", 511) or 511, gate=gate, probe=probe,
        connect_timeout=r.number("connect_timeout", 5.0),
        idle_timeout=r.number("idle_timeout", 600.0),
        greeting_timeout=_greeting(r),
        greeting_timeout_max=r.number("greeting_timeout_max", 10.0),
        send_proxy=r.choice("send_proxy", ("v1", "v2"), None),
        hostname=r.get("hostname", str), discovery=discovery, access=access,
        reuse_port=r.get("reuse_port", bool, False), nodelay=r.get("nodelay", bool, True),
        keepalive=r.get("keepalive", bool, False),
        relay=_relay(r),
    )
    r.done()
    return lc


def _backends(r: _Reader, probe: ProbeConfig) -> list[BackendConfig]:
    out: list[BackendConfig] = []
    single = r.get("backend", str)
    if single is not None:
        out.append(BackendConfig(r.wrap("backend", parse_endpoint, single, "backend"),
                                 local=True, key=r.key("backend")))
    items = r.get("backends", list) or []
    for i, item in enumerate(items):
        key = f"backends.{i}"
        if isinstance(item, str):
            out.append(BackendConfig(r.wrap(key, parse_endpoint, item, key), priority=i,
                                     key=r.key(key)))
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
        out.append(BackendConfig(ep, priority=prio or 0, local=local, probe=bprobe,
                                 key=br.key("address")))
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
# printing the effective config


def to_dict(obj: Any) -> Any:
    """Plain data for printing the effective config (check-config, /status); fields the
    load step derived (resolved addresses, places) are left out."""
    if isinstance(obj, Endpoint):
        return str(obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)
                if getattr(obj, f.name) is not None and not f.metadata.get("derived")}
    if isinstance(obj, tuple | list):
        return [to_dict(x) for x in obj]
    return obj


def to_toml(cfg: Config, *, from_xinetd: bool = False) -> str:
    """Render a Config back to TOML that `parse_toml` reads to the same Config.
    `from_xinetd`: add the comments a converted xinetd service needs."""
    out: list[str] = []
    if from_xinetd:
        out.append(f"# converted from {cfg.source} by forwarder convert-xinetd")
    if cfg.user:
        out.append(f"user = {_tv(cfg.user)}")
    if cfg.group:
        out.append(f"group = {_tv(cfg.group)}")
    out.append(f"drain_timeout = {_tv(cfg.drain_timeout)}")
    if cfg.state_file:
        out.append(f"state_file = {_tv(cfg.state_file)}")
    out.append(f"workers = {_tv(cfg.workers)}")
    if cfg.dashboard_url:
        out.append(f"dashboard_url = {_tv(cfg.dashboard_url)}")
    if cfg.admin:
        out.append(f"admin = {_tv(str(cfg.admin))}")
    elif from_xinetd:
        out.append('# admin = "127.0.0.1:9125"  # uncomment for /metrics, /status, '
                   "drain and resume")
    out += ["", "[log]", f"format = {_tv(cfg.log.format)}", f"level = {_tv(cfg.log.level)}"]
    for lc in cfg.listeners:
        out += ["", "[[listener]]"]
        for k in ("name", "addresses", "port", "mode", "backlog", "gate", "connect_timeout",
                  "idle_timeout", "greeting_timeout", "greeting_timeout_max", "send_proxy",
                  "hostname", "reuse_port",
                  "nodelay", "keepalive", "relay"):
            v = getattr(lc, k)
            if v is not None:
                note = ""
                if from_xinetd and k in ("nodelay", "keepalive") and not v:
                    note = (f"  # xinetd's default (no flags = {k.upper()}); the forwarder's "
                            f"own default is {'true' if k == 'nodelay' else 'false'}")
                out.append(f"{k} = {_tv(v)}{note}")
        out += _probe_lines("listener.probe", lc.probe)
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
                out += _probe_lines("listener.backends.probe", b.probe)
    return "\n".join(out) + "\n"


def _probe_lines(table: str, p: ProbeConfig) -> list[str]:
    """A probe table and its [[...checks]]; check fields at their default are left out."""
    plain = to_dict(CheckConfig())

    def keys(d: dict[str, Any]) -> list[str]:
        return [f"{k} = {_tv(v)}" for k, v in d.items()
                if k in ("kind", "timeout") or k not in plain or v != plain[k]]

    d = to_dict(p)
    d.pop("checks", None)
    out = [f"[{table}]", *keys(d)]
    for c in p.checks:
        out += [f"[[{table}.checks]]", *keys(to_dict(c))]
    return out


def _tv(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return str(int(v))  # 10, not 10.0: the reader takes either for a number
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, tuple | list):
        return "[" + ", ".join(_tv(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    s = _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", s)  # TOML strings are one line
    return f'"{s}"'
