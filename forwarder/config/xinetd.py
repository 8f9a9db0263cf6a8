"""Read xinetd's configuration language (xinetd.conf(5)) into a `Config`.

Only what the forwarder can do faithfully is accepted: TCP stream services with
`redirect = HOST PORT` and `wait = no`.  Everything else that xinetd can run (a `server`
program, UDP, RPC, internal services, `wait = yes` ...) is *unsupported*: an error naming
file and line, or, with `skip_unsupported`, a logged `xinetd.skipped` and the service left
out.  Disabled services are left out silently.  Unknown attributes and syntax errors are
always errors, because a typo in an access rule must not widen access.

Mapping (one `ListenerConfig` per service):

- `bind`/`interface` -> addresses; default all addresses (`0.0.0.0`; with `flags = IPv6`
  also `::`, as xinetd's IPv6 socket is dual-stack unless `v6only = yes`)
- `port` (default: the service name in /etc/services) -> port
- `redirect` -> the one (local) backend; mode and probe `smtp` for port 25 / service smtp
- `only_from`, `no_access`, `instances`, `per_source`, `cps` -> access (defaults inherit)
- `flags` NODELAY / KEEPALIVE -> nodelay / keepalive; `user` / `group` -> Config.user/group
  (`user = root` is not taken: see `_build`)

The result goes through the same shared checks as a TOML file (checks.validate), its errors
named by service and line.

Size: about 700 lines, because xinetd's language is large (defaults inheritance, includes,
`+=`/`-=`, factorized addresses, services lookup) and every part of it must either map
faithfully or fail with file and line; splitting syntax from mapping would put the two
halves of each attribute's rule in different files.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from .checks import validate
from .load import MAX_FILE_SIZE, read_file
from .model import (
    AccessConfig,
    BackendConfig,
    Config,
    ConfigError,
    Cps,
    Endpoint,
    ListenerConfig,
    Mode,
    Place,
    ProbeConfig,
    check_host,
    check_network,
    check_port,
    default_probe_kind,
    printable,
)

__all__ = ["MAX_FILE_SIZE", "load", "parse_text"]

MAX_INCLUDE_DEPTH = 16

# list-valued attributes: `+=` and `-=` allowed, and repeated `=` lines accumulate
LIST_ATTRS = frozenset({
    "only_from", "no_access", "flags", "log_on_success", "log_on_failure", "type",
    "passenv", "env", "disabled", "enabled", "access_times", "server_args",
})
# attributes a service inherits from `defaults` when it does not set them itself
INHERITED = frozenset({
    "only_from", "no_access", "instances", "per_source", "cps", "log_type",
    "log_on_success", "log_on_failure", "passenv", "banner", "banner_success", "banner_fail",
    "groups", "max_load", "umask", "v6only", "bind", "interface", "flags",
})
DEFAULTS_ONLY = frozenset({"disabled", "enabled"})
# accepted and ignored: they change logging, the spawned server or resource limits, none
# of which exists for a redirect in the forwarder
IGNORED = frozenset({
    "id", "log_type", "log_on_success", "log_on_failure", "banner", "banner_success",
    "banner_fail", "max_load", "server_args", "nice", "env", "passenv", "groups", "umask",
    "rlimit_as", "rlimit_cpu", "rlimit_data", "rlimit_rss", "rlimit_stack", "rlimit_files",
    "deny_time", "mdns", "libwrap", "rpc_version", "rpc_number", "v6only",
})
HANDLED = frozenset({
    "type", "flags", "socket_type", "protocol", "wait", "user", "group", "instances",
    "server", "only_from", "no_access", "port", "redirect", "bind", "interface",
    "per_source", "disable", "cps", "access_times",
})
KNOWN = IGNORED | HANDLED | DEFAULTS_ONLY

_BLANKS = " \t\r\f\v"  # C's isspace() but \n; Python's strip()/split() take Unicode spaces


def _words(s: str) -> list[str]:
    return [w for w in re.split(r"[ \t\r\f\v]+", s) if w]


def _digits(s: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '²' and Arabic-Indic digits."""
    return s.isascii() and s.isdigit()


_ATTR_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)[ \t\r\f\v]*(\+=|-=|=)[ \t\r\f\v]*(.*)$")
_NAME_OK = re.compile(r"^[^\s{}=#]+$")


def _log() -> Any:
    # Before logs.setup() (convert-xinetd, check-config) structlog would print to stdout,
    # into the TOML being printed: warn on stderr then.
    if structlog.is_configured():
        return structlog.get_logger("forwarder.xinetd")
    return structlog.wrap_logger(structlog.PrintLogger(file=sys.stderr))


class Unsupported(ConfigError):
    """A construct xinetd runs but the forwarder cannot: skippable with skip_unsupported."""


# ---------------------------------------------------------------------------------------
# syntax: files -> blocks of attribute operations


@dataclass
class _Op:
    name: str
    op: str  # "=", "+=", "-="
    values: list[str]
    file: str
    line: int


@dataclass
class _Block:
    kind: str  # "defaults" | "service"
    name: str
    file: str
    line: int
    ops: list[_Op] = field(default_factory=list)

    def first(self, name: str) -> _Op | None:
        return next((o for o in self.ops if o.name == name), None)


_esc = printable


def _read(path: str, *, at: tuple[str, int] | None = None) -> str:
    return read_file(path, at=at).decode("utf-8", errors="replace")


def _dir_files(path: str, *, at: tuple[str, int] | None = None) -> list[str]:
    """The files xinetd reads from an includedir: no '.' in the name, no trailing '~'."""
    file, line = at if at else (path, None)
    what = f"{_esc(path)}: " if at else ""  # the directory is already the error's file
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        raise ConfigError(f"{what}cannot read directory: {e.strerror}", file=file,
                          line=line) from None
    except ValueError:  # a NUL in a path from an includedir line
        raise ConfigError(f"{what}cannot read directory: a path cannot hold a NUL character",
                          file=file, line=line) from None
    out = []
    for n in names:
        if "." in n or n.endswith("~"):
            continue
        p = os.path.join(path, n)
        if os.path.isfile(p):
            out.append(p)
    return out


class _Parser:
    def __init__(self) -> None:
        self.blocks: list[_Block] = []

    def parse(self, text: str, file: str, depth: int = 0) -> None:
        lines = text.split("\n")  # xinetd reads with fgets: only \n ends a line
        i = 0
        while i < len(lines):
            no = i + 1
            s = _strip(lines[i])
            i += 1
            if not s:
                continue
            words = _words(s)
            head = words[0]
            if head in ("include", "includedir"):
                if len(words) != 2:
                    raise ConfigError(f"{head}: expected exactly one path", file=file,
                                      line=no, key=head)
                self._include(head, words[1], file, no, depth)
                continue
            if head in ("defaults", "service"):
                if head == "defaults":
                    rest, name = words[1:], "defaults"
                    if rest and rest != ["{"]:
                        raise ConfigError(f"unexpected {' '.join(rest)!r} after defaults",
                                          file=file, line=no, key="defaults")
                else:
                    if len(words) < 2 or words[1] == "{":
                        raise ConfigError("service: missing the service name", file=file,
                                          line=no, key="service")
                    name, rest = words[1], words[2:]
                    if not _NAME_OK.match(name) or not name.isprintable():
                        raise ConfigError(f"bad service name {name!r}", file=file, line=no,
                                          key="service")
                    if rest and rest != ["{"]:
                        raise ConfigError(f"unexpected {' '.join(rest)!r} after the service "
                                          "name (one name per service)", file=file, line=no,
                                          key=f"service {name}")
                block = _Block(head, name, file, no)
                if not rest:
                    # the brace on a following line
                    while i < len(lines) and not _strip(lines[i]):
                        i += 1
                    if i >= len(lines) or _strip(lines[i]) != "{":
                        where = i + 1 if i < len(lines) else no
                        raise ConfigError(f"missing '{{' after {head} {name}".rstrip(),
                                          file=file, line=where, key=_bkey(block))
                    i += 1
                i = self._body(block, lines, i, file)
                self.blocks.append(block)
                continue
            if head == "}":
                raise ConfigError("'}' without an open block", file=file, line=no)
            raise ConfigError(f"expected service, defaults, include or includedir, got "
                              f"{head!r}", file=file, line=no)

    def _body(self, block: _Block, lines: list[str], i: int, file: str) -> int:
        while i < len(lines):
            no = i + 1
            s = _strip(lines[i])
            i += 1
            if not s:
                continue
            if s == "}":
                return i
            if s.startswith(("service ", "defaults", "include")) and "=" not in s:
                raise ConfigError(f"missing '}}' to close {block.kind} {block.name} (opened "
                                  f"at line {block.line})", file=file, line=no,
                                  key=_bkey(block))
            m = _ATTR_RE.match(s)
            if not m:
                raise ConfigError(f"expected 'attribute = value' or '}}', got {s!r}",
                                  file=file, line=no, key=_bkey(block))
            name, op, rest = m.group(1), m.group(2), m.group(3)
            if name not in KNOWN:
                raise ConfigError("unknown attribute", file=file, line=no, key=name)
            if op != "=" and name not in LIST_ATTRS:
                raise ConfigError(f"{op} is only allowed for list attributes "
                                  f"({', '.join(sorted(LIST_ATTRS))})", file=file, line=no,
                                  key=name)
            if block.kind == "defaults" and name not in INHERITED | DEFAULTS_ONLY:
                raise ConfigError("not allowed in defaults", file=file, line=no, key=name)
            if block.kind == "service" and name in DEFAULTS_ONLY:
                raise ConfigError("only allowed in defaults", file=file, line=no, key=name)
            if op == "=" and name not in LIST_ATTRS:
                prev = block.first(name)
                if prev is not None:
                    raise ConfigError(f"set twice (first at {_esc(prev.file)}:{prev.line})",
                                      file=file, line=no, key=name)
            block.ops.append(_Op(name, op, _words(rest), file, no))
        raise ConfigError(f"missing '}}' to close {block.kind} {block.name} (opened at line "
                          f"{block.line})", file=file, line=block.line, key=_bkey(block))

    def _include(self, kind: str, target: str, file: str, line: int, depth: int) -> None:
        if depth >= MAX_INCLUDE_DEPTH:
            raise ConfigError(f"includes nested deeper than {MAX_INCLUDE_DEPTH}", file=file,
                              line=line, key=kind)
        # relative to the including file (xinetd: to its working directory, usually /)
        path = os.path.normpath(os.path.join(os.path.dirname(file), target))
        at = (file, line)
        if kind == "includedir":
            for p in _dir_files(path, at=at):
                self.parse(_read(p, at=at), p, depth + 1)
        else:
            self.parse(_read(path, at=at), path, depth + 1)


def _strip(line: str) -> str:
    """The line without surrounding blanks; a comment line (first non-blank '#') is empty.

    As in xinetd, a '#' later in a line is not a comment: it is a value (and then most
    likely a wrong number of values, which is an error here and a warning in xinetd).
    """
    s = line.strip(_BLANKS)
    return "" if s.startswith("#") else s


def _bkey(b: _Block) -> str:
    return "defaults" if b.kind == "defaults" else f"service {b.name}"


# ---------------------------------------------------------------------------------------
# semantics: blocks -> listeners


class _Attrs:
    """The effective attributes of one service: its own operations over the defaults."""

    def __init__(self, block: _Block, defaults: dict[str, tuple[list[str], _Op]]) -> None:
        self.block = block
        self.values: dict[str, tuple[list[str], _Op | None]] = {}
        for name, (vals, op) in defaults.items():
            if name in INHERITED:
                self.values[name] = (list(vals), op)
        own: dict[str, list[str]] = {}
        for op in block.ops:
            if op.name in LIST_ATTRS:
                if op.name not in own:
                    own[op.name] = (list(self.values.get(op.name, ([], None))[0])
                                    if op.op != "=" else [])
                own[op.name] = _apply(own[op.name], op)
                self.values[op.name] = (own[op.name], op)
            else:
                self.values[op.name] = (op.values, op)

    def get(self, name: str) -> tuple[list[str], _Op | None] | None:
        return self.values.get(name)

    def one(self, name: str, *, lower: bool = True) -> tuple[str, _Op] | None:
        v = self.values.get(name)
        if v is None:
            return None
        vals, op = v
        assert op is not None
        if len(vals) != 1:
            raise self.err(op, f"expected one value, got {len(vals)}: {' '.join(vals)!r}")
        return (vals[0].lower() if lower else vals[0]), op

    def origin(self, name: str, value: str, fallback: _Op | None) -> _Op | None:
        """The operation that brought `value` into list attribute `name` (for its line)."""
        v = value.upper()
        for op in self.block.ops:
            if op.name == name and op.op != "-=" and v in (x.upper() for x in op.values):
                return op
        return fallback

    def err(self, op: _Op | None, message: str, cls: type[ConfigError] = ConfigError
            ) -> ConfigError:
        if op is None:
            return cls(message, file=self.block.file, line=self.block.line,
                       key=_bkey(self.block))
        return cls(message, file=op.file, line=op.line, key=f"{_bkey(self.block)}: {op.name}")


def _apply(current: list[str], op: _Op) -> list[str]:
    if op.op == "-=":
        drop = set(op.values)
        return [v for v in current if v not in drop]
    return current + [v for v in op.values if v not in current]


def _defaults(blocks: list[_Block]) -> dict[str, tuple[list[str], _Op]]:
    out: dict[str, tuple[list[str], _Op]] = {}
    for b in blocks:
        if b.kind != "defaults":
            continue
        for op in b.ops:
            if op.name in LIST_ATTRS:
                # repeated `=` lines accumulate
                cur = out[op.name][0] if op.name in out else []
                out[op.name] = (_apply(cur, op), op)
            else:
                out[op.name] = (op.values, op)
    return out


_YES_NO = {"yes": True, "no": False}


def _yes_no(a: _Attrs, name: str, default: bool) -> bool:
    v = a.one(name)
    if v is None:
        return default
    if v[0] not in _YES_NO:
        raise a.err(v[1], f"expected yes or no, got {v[0]!r}")
    return _YES_NO[v[0]]


def _limit(a: _Attrs, name: str) -> int | None:
    v = a.one(name, lower=False)
    if v is None:
        return None
    s, op = v
    if s.upper() == "UNLIMITED":
        return None
    if not _digits(s) or int(s) < 1 or int(s) > 1_000_000_000:
        raise a.err(op, f"expected a number >= 1 or UNLIMITED, got {s!r}")
    return int(s)


def _cps(a: _Attrs) -> Cps | None:
    v = a.get("cps")
    if v is None:
        return None
    vals, op = v
    if (len(vals) != 2 or not all(_digits(x) for x in vals) or int(vals[0]) < 1
            or int(vals[1]) < 1 or int(vals[0]) > 1_000_000_000 or int(vals[1]) > 86400 * 365):
        raise a.err(op, f"expected 'cps = RATE PAUSE_SECONDS' (both >= 1), got "
                        f"{' '.join(vals)!r}")
    return Cps(int(vals[0]), float(int(vals[1])))


def _ipv4_wildcard(parts: list[str]) -> str | None:
    """xinetd's numeric IPv4 forms: missing or trailing zero components are wildcards
    (`10.1.2.0` = 10.1.2.0/24, `0.0.0.0` = everyone)."""
    if not 1 <= len(parts) <= 4 or not all(_digits(p) and len(p) <= 3 and int(p) <= 255
                                           for p in parts):
        return None
    nums = [int(p) for p in parts] + [0] * (4 - len(parts))
    keep = 4
    while keep > 0 and nums[keep - 1] == 0:
        keep -= 1
    return f"{'.'.join(map(str, nums))}/{keep * 8}"


def _address(entry: str, a: _Attrs, op: _Op) -> list[str]:
    """One only_from / no_access entry to forwarder access entries."""
    m = re.fullmatch(r"((?:[0-9]{1,3}\.){1,3})\{([0-9, \t\r\f\v]*)\}", entry)
    if m:
        prefix = m.group(1).rstrip(".").split(".")
        items = [x for x in m.group(2).split(",") if x.strip(_BLANKS)]
        if not items:
            raise a.err(op, f"empty factorized address {entry!r}")
        out = []
        for x in items:
            net = _ipv4_wildcard([*prefix, x.strip(_BLANKS)])
            if net is None:
                raise a.err(op, f"bad factorized address {entry!r}")
            out.append(net)
        return out
    if re.fullmatch(r"[0-9.]+", entry):
        net = _ipv4_wildcard(entry.split("."))
        if net is None:
            raise a.err(op, f"bad IPv4 address {entry!r}")
        return [net]
    if "/" in entry or ":" in entry:
        try:
            return [str(ipaddress.ip_network(entry, strict=False))]
        except ValueError:
            raise a.err(op, f"bad address or network {entry!r}") from None
    if entry.startswith("."):
        raise a.err(op, f"domain wildcards ({entry!r}) are not supported: they need a "
                        "reverse lookup per connection; list the addresses", Unsupported)
    try:
        return [check_network(entry, op.name)]
    except ConfigError as e:
        raise a.err(op, e.message) from None


def _access(a: _Attrs) -> AccessConfig:
    lists: dict[str, list[str]] = {}
    for name in ("only_from", "no_access"):
        v = a.get(name)
        out: list[str] = []
        if v is not None:
            vals, op = v
            assert op is not None
            for entry in vals:
                for x in _address(entry, a, op):
                    if x not in out:
                        out.append(x)
        lists[name] = out
    only = a.get("only_from")
    if only is not None and not lists["only_from"]:
        # `only_from =` with no value: xinetd refuses everyone
        for x in ("0.0.0.0/0", "::/0"):
            if x not in lists["no_access"]:
                lists["no_access"].append(x)
    return AccessConfig(only_from=tuple(lists["only_from"]),
                        no_access=tuple(lists["no_access"]),
                        instances=_limit(a, "instances"), per_source=_limit(a, "per_source"),
                        cps=_cps(a))


@dataclass
class _Service:
    listener: ListenerConfig
    user: str | None
    group: str | None


def _service(b: _Block, defaults: dict[str, tuple[list[str], _Op]]) -> _Service:
    a = _Attrs(b, defaults)

    def bad(op: _Op | None, msg: str) -> ConfigError:
        return a.err(op, msg, Unsupported)

    types = a.get("type")
    type_set: set[str] = set()
    if types is not None:
        for t in types[0]:
            tu = t.upper()
            if tu not in ("RPC", "INTERNAL", "TCPMUX", "TCPMUXPLUS", "UNLISTED"):
                raise a.err(a.origin("type", t, types[1]), f"unknown type {t!r}")
            if tu != "UNLISTED":
                raise bad(a.origin("type", t, types[1]),
                          f"type {tu} is not supported (only redirect services)")
            type_set.add(tu)
    st = a.one("socket_type")
    if st is not None and st[0] != "stream":
        raise bad(st[1], f"socket_type {st[0]!r} is not supported (only stream)")
    proto = a.one("protocol")
    if proto is not None and proto[0] != "tcp":
        raise bad(proto[1], f"protocol {proto[0]!r} is not supported (only tcp)")
    if _yes_no(a, "wait", False):
        wait = a.get("wait")
        raise bad(wait[1] if wait else None,
                  "wait = yes is not supported (a redirect needs wait = no)")
    redirect = a.get("redirect")
    server = a.get("server")
    if redirect is None:
        raise bad(server[1] if server else None,
                  "a service that runs a server program is not supported (only redirect)"
                  if server else "no redirect = HOST PORT")
    times = a.get("access_times")
    if times is not None and times[0]:
        raise bad(times[1], "access_times is not supported")
    flags: set[str] = set()
    fv = a.get("flags")
    if fv is not None:
        flags = {f.upper() for f in fv[0]}
        for f in ("SENSOR", "IDONLY"):
            if f in flags:
                raise bad(a.origin("flags", f, fv[1]), f"flag {f} is not supported")

    rvals, rop = redirect
    assert rop is not None
    if len(rvals) != 2:
        raise a.err(rop, f"expected 'redirect = HOST PORT', got {' '.join(rvals)!r}")
    try:
        rhost = check_host(rvals[0], "redirect")
    except ConfigError as e:
        raise a.err(rop, e.message) from None
    backend = Endpoint(rhost, _port(a, rvals[1], rop))

    port = _listen_port(a, b, "UNLISTED" in type_set)
    addrs = _addresses(a, flags)
    mode: Mode = "smtp" if b.name == "smtp" or port == 25 else "tcp"
    lc = ListenerConfig(
        name=b.name, addresses=addrs, port=port,
        backends=(BackendConfig(backend, priority=0, local=True),), mode=mode,
        probe=ProbeConfig(kind=default_probe_kind(mode)), access=_access(a),
        reuse_port=False, nodelay="NODELAY" in flags, keepalive="KEEPALIVE" in flags)
    user = _name(a, "user")
    group = _name(a, "group")
    return _Service(lc, user, group)


def _name(a: _Attrs, attr: str) -> str | None:
    v = a.one(attr, lower=False)
    if v is None:
        return None
    if not v[0].isprintable():
        raise a.err(v[1], f"bad {attr} name {v[0]!r}")
    return v[0]


def _port(a: _Attrs, s: str, op: _Op) -> int:
    if not _digits(s):
        raise a.err(op, f"expected a port number, got {s!r}")
    try:
        return check_port(int(s), op.name)
    except ConfigError as e:
        raise a.err(op, e.message) from None


def _listen_port(a: _Attrs, b: _Block, unlisted: bool) -> int:
    v = a.one("port")
    known: int | None = None
    if not unlisted:
        try:
            known = socket.getservbyname(b.name, "tcp")
        except (OSError, UnicodeError, ValueError):
            known = None
    if v is None:
        if unlisted:
            raise a.err(None, "type = UNLISTED needs a port")
        if known is None:
            raise a.err(None, f"no port, and {b.name!r} is not a tcp service in "
                              "/etc/services: add port = N")
        return known
    port = _port(a, v[0], v[1])
    if known is not None and known != port:
        raise a.err(v[1], f"port {port} differs from {b.name}'s port {known} in "
                          "/etc/services (xinetd refuses this too): add type = UNLISTED")
    return port


def _addresses(a: _Attrs, flags: set[str]) -> tuple[str, ...]:
    v = a.one("bind", lower=False) or a.one("interface", lower=False)
    if v is not None:
        try:
            return (check_host(v[0], v[1].name),)
        except ConfigError as e:
            raise a.err(v[1], e.message) from None
    if "IPV6" in flags:
        # xinetd's IPv6 socket also takes IPv4 (v6only = no); the forwarder's are v6-only
        return ("::",) if _yes_no(a, "v6only", False) else ("0.0.0.0", "::")
    return ("0.0.0.0",)


def _enabled(b: _Block, defaults: dict[str, tuple[list[str], _Op]]) -> bool:
    """`disable = yes`, or the service id (default: its name) listed in the defaults'
    `disabled`, or not listed in `enabled` when that is given."""
    a = _Attrs(b, {})
    if _yes_no(a, "disable", False):
        return False
    ident = a.one("id", lower=False)
    sid = ident[0] if ident else b.name
    if sid in defaults.get("disabled", ([], None))[0]:
        return False
    en = defaults.get("enabled")
    return not (en is not None and sid not in en[0])


def _build(blocks: list[_Block], source: str, skip_unsupported: bool) -> Config:
    defaults = _defaults(blocks)
    services: list[tuple[_Block, _Service]] = []
    for b in blocks:
        if b.kind != "service" or not _enabled(b, defaults):
            continue
        try:
            services.append((b, _service(b, defaults)))
        except Unsupported as e:
            if not skip_unsupported:
                raise
            _log().warning("xinetd.skipped", service=b.name, file=e.file, line=e.line,
                           reason=e.message)
    if not services:
        raise ConfigError("no enabled redirect service", file=source)
    listeners: list[ListenerConfig] = []
    names: set[str] = set()
    user = next((s.user for _, s in services if s.user), None)
    group = next((s.group for _, s in services if s.group), None)
    for b, s in services:
        lc = s.listener
        name, n = lc.name, 1
        while name in names:
            n += 1
            name = f"{lc.name}-{n}"
        names.add(name)
        if name != lc.name:
            lc = replace(lc, name=name)
        listeners.append(lc)
        if (s.user and s.user != user) or (s.group and s.group != group):
            _log().warning("xinetd.user_differs", service=b.name, user=s.user, group=s.group,
                           using_user=user, using_group=group,
                           detail="one process runs every service: the first user/group wins")
    if user == "root":
        # xinetd itself must run as root to spawn servers, so service files say root all
        # the time; that is no request to keep a port forwarder root.  --user root is.
        _log().info("xinetd.user_root", detail="the files say user = root: the forwarder "
                                               "drops to nobody; pass --user root to keep root")
        user = None
    return validate(Config(listeners=tuple(listeners), user=user, group=group, source=source,
                           places=_Place(source, [b for b, _ in services])))


class _Place(Place):
    """Errors found by the shared checks, named by service and its line."""

    def __init__(self, file: str, blocks: list[_Block]) -> None:
        super().__init__(file)
        self.blocks = blocks

    def error(self, index: int | None, name: str, message: str) -> ConfigError:
        if index is None or index >= len(self.blocks):
            return ConfigError(message, file=self.file, key=name)
        b = self.blocks[index]
        attr = {"addresses": "bind", "name": "service"}.get(name, name)
        return ConfigError(message, file=b.file, line=b.line, key=f"{_bkey(b)}: {attr}")


# ---------------------------------------------------------------------------------------
# entry points


def parse_text(text: str, file: str = "<string>", *, skip_unsupported: bool = False) -> Config:
    """Parse xinetd configuration text (includes are relative to `file`'s directory)."""
    p = _Parser()
    p.parse(text, file)
    return _build(p.blocks, file, skip_unsupported)


def load(path: str, *, skip_unsupported: bool = False) -> Config:
    """Load an xinetd.conf, a single service file, or a directory like /etc/xinetd.d."""
    p = _Parser()
    if os.path.isdir(path):
        for f in _dir_files(path):
            p.parse(_read(f), f)
    else:
        p.parse(_read(path), path)
    return _build(p.blocks, str(Path(path)), skip_unsupported)
