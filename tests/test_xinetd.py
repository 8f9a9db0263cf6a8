"""The xinetd.conf(5) reader: syntax, defaults, mapping to ListenerConfig, errors with
file:line, a corpus of real files, property tests and the convert-xinetd CLI."""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from forwarder.config import xinetd
from forwarder.config.model import (
    AccessConfig,
    BackendConfig,
    Config,
    ConfigError,
    Cps,
    Endpoint,
    ListenerConfig,
    Mode,
    ProbeConfig,
)
from forwarder.config.toml import parse_toml, to_toml
from tests.helpers import ROOT, run_cli

DATA = ROOT / "tests" / "data" / "xinetd"

SMTP = """\
service smtp
{
\tdisable\t\t= no
\tsocket_type\t= stream
\tprotocol\t= tcp
\tuser\t\t= nobody
\twait\t\t= no
\tredirect\t= 127.0.0.1 8025
}
"""


def write(tmp: Path, name: str, text: str) -> str:
    p = tmp / name
    p.write_text(text)
    return str(p)


def service(body: str, name: str = "svc", head: str = "") -> str:
    return f"{head}\nservice {name}\n{{\n{body}\n}}\n"


REDIRECT = "type = UNLISTED\nport = 4025\nsocket_type = stream\nwait = no\n" \
           "redirect = 127.0.0.1 8025\n"


def one(text: str, **kw: bool) -> Config:
    return xinetd.parse_text(text, "test.conf", **kw)


def err(text: str, **kw: bool) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        xinetd.parse_text(text, "test.conf", **kw)
    return ei.value


def roundtrip(cfg: Config) -> None:
    """The TOML printed for a config reads back to the very same config."""
    text = to_toml(cfg)
    try:
        again = parse_toml(text, cfg.source)
    except ConfigError as e:
        raise AssertionError(f"to_toml printed what parse_toml refuses: {e}\n{text}") from None
    assert again == cfg, text


# --- the motivating file ----------------------------------------------------------------


def test_motivating_smtp_file(tmp_path: Path) -> None:
    cfg = xinetd.load(write(tmp_path, "smtp", SMTP))
    assert cfg.user == "nobody"
    assert cfg.source == str(tmp_path / "smtp")
    (lc,) = cfg.listeners
    assert lc.name == "smtp"
    assert lc.port == 25
    assert lc.addresses == ("0.0.0.0",)
    assert lc.backends == (BackendConfig(Endpoint("127.0.0.1", 8025), priority=0, local=True),)
    assert lc.mode == "smtp"
    assert lc.probe == ProbeConfig(kind="smtp")
    assert lc.access == AccessConfig()
    assert not lc.reuse_port
    roundtrip(cfg)


def test_tcp_mode_for_other_ports() -> None:
    (lc,) = one(service(REDIRECT)).listeners
    assert (lc.name, lc.port, lc.mode, lc.probe.kind) == ("svc", 4025, "tcp", "tcp")
    (lc,) = one(service(REDIRECT.replace("4025", "25"))).listeners
    assert (lc.mode, lc.probe.kind) == ("smtp", "smtp")


# --- defaults and list operators --------------------------------------------------------


DEFAULTS = """\
defaults
{
\tonly_from = 127.0.0.1 10.0.0.0
\tno_access = 10.0.0.66
\tinstances = 30
\tper_source = 5
\tcps = 10 3
\tlog_type = SYSLOG daemon info
}
"""


def test_defaults_inherit() -> None:
    (lc,) = one(DEFAULTS + service(REDIRECT)).listeners
    assert lc.access == AccessConfig(only_from=("127.0.0.1/32", "10.0.0.0/8"),
                                     no_access=("10.0.0.66/32",), instances=30, per_source=5,
                                     cps=Cps(10, 3.0))


def test_service_overrides_and_adds_and_removes() -> None:
    body = REDIRECT + "only_from += 192.168.1.5\nno_access -= 10.0.0.66\ninstances = 7\n"
    (lc,) = one(DEFAULTS + service(body)).listeners
    assert lc.access.only_from == ("127.0.0.1/32", "10.0.0.0/8", "192.168.1.5/32")
    assert lc.access.no_access == ()
    assert lc.access.instances == 7
    body = REDIRECT + "only_from = 192.168.1.5\nonly_from -= 192.168.1.5\nonly_from += ::1\n"
    (lc,) = one(DEFAULTS + service(body)).listeners
    assert lc.access.only_from == ("::1/128",)


def test_repeated_list_assignment_accumulates_like_xinetd() -> None:
    head = "defaults\n{\nonly_from = 127.0.0.1\nonly_from = 127.0.0.5\n}\n"
    (lc,) = one(head + service(REDIRECT)).listeners
    assert lc.access.only_from == ("127.0.0.1/32", "127.0.0.5/32")


def test_scalar_set_twice_is_an_error() -> None:
    e = err(service(REDIRECT + "instances = 5\ninstances = 6"))
    assert e.line == 10 and e.key == "instances" and "set twice" in str(e)


def test_only_from_empty_denies_everyone() -> None:
    (lc,) = one(service(REDIRECT + "only_from =")).listeners
    assert lc.access.only_from == ()
    assert set(lc.access.no_access) == {"0.0.0.0/0", "::/0"}


@pytest.mark.parametrize(("entry", "nets"), [
    ("0.0.0.0", ["0.0.0.0/0"]),
    ("10.1.2.0", ["10.1.2.0/24"]),
    ("10.1.0.0", ["10.1.0.0/16"]),
    ("10.0.0.0", ["10.0.0.0/8"]),
    ("10.1.2.3", ["10.1.2.3/32"]),
    ("10.0.0.{1,2,3}", ["10.0.0.1/32", "10.0.0.2/32", "10.0.0.3/32"]),
    ("128.138.{24,26}", ["128.138.24.0/24", "128.138.26.0/24"]),
    ("192.168.1.0/25", ["192.168.1.0/25"]),
    ("10.1.2.3/8", ["10.0.0.0/8"]),
    ("2001:db8::/32", ["2001:db8::/32"]),
    ("::1", ["::1/128"]),
    ("mail.example.org", ["mail.example.org"]),
    ("localhost", ["localhost"]),
])
def test_address_forms(entry: str, nets: list[str]) -> None:
    (lc,) = one(service(REDIRECT + f"only_from = {entry}")).listeners
    assert list(lc.access.only_from) == nets
    roundtrip(one(service(REDIRECT + f"only_from = {entry}")))


@pytest.mark.parametrize("entry", ["300.1.1.1", "10.0.0.{}", "10.0.0.{1,x}", "fe80::/200",
                                   "bad_host!", "1.2.3.4.5"])
def test_bad_addresses(entry: str) -> None:
    e = err(service(REDIRECT + f"only_from = {entry}"))
    assert e.line == 9 and e.file == "test.conf"


def test_domain_wildcard_is_unsupported() -> None:
    e = err(service(REDIRECT + "no_access = .example.org"))
    assert isinstance(e, xinetd.Unsupported) and e.line == 9


# --- port, type, flags, limits ----------------------------------------------------------


def test_port_from_etc_services() -> None:
    try:
        expected = socket.getservbyname("submission", "tcp")
    except OSError:
        pytest.skip("no submission in /etc/services")
    body = "socket_type = stream\nwait = no\nredirect = 127.0.0.1 8587"
    (lc,) = one(service(body, name="submission")).listeners
    assert lc.port == expected


def test_unknown_service_name_needs_port() -> None:
    body = "socket_type = stream\nwait = no\nredirect = 127.0.0.1 8587"
    e = err(service(body, name="no-such-service-xyz"))
    assert e.line == 2 and "/etc/services" in str(e) and "test.conf:2" in str(e)


def test_port_must_match_etc_services_unless_unlisted() -> None:
    body = "socket_type = stream\nwait = no\nredirect = 127.0.0.1 8025\nport = 2525"
    e = err(service(body, name="smtp"))
    assert e.line == 7 and "UNLISTED" in str(e)
    (lc,) = one(service(body + "\ntype = UNLISTED", name="smtp")).listeners
    assert lc.port == 2525 and lc.mode == "smtp"


def test_unlisted_needs_port() -> None:
    e = err(service("type = UNLISTED\nsocket_type = stream\nredirect = 127.0.0.1 1"))
    assert e.line == 2 and "needs a port" in str(e)


@pytest.mark.parametrize("port", ["0", "65536", "abc", "-1"])
def test_bad_port(port: str) -> None:
    e = err(service(REDIRECT.replace("port = 4025", f"port = {port}")))
    assert e.line == 5


def test_cps_instances_per_source() -> None:
    (lc,) = one(service(REDIRECT + "cps = 50 10\ninstances = UNLIMITED\nper_source = 3"))\
        .listeners
    assert lc.access == AccessConfig(instances=None, per_source=3, cps=Cps(50, 10.0))
    for bad in ("cps = 50", "cps = 0 10", "cps = a b", "instances = 0", "per_source = -2",
                "instances = lots"):
        assert err(service(REDIRECT + bad)).line == 9, bad


def test_flags() -> None:
    (lc,) = one(service(REDIRECT + "flags = REUSE NODELAY KEEPALIVE NORETRY WHATEVER"))\
        .listeners
    assert (lc.nodelay, lc.keepalive, lc.reuse_port) == (True, True, False)
    (lc,) = one(service(REDIRECT + "flags = IPv4")).listeners
    assert (lc.nodelay, lc.keepalive, lc.addresses) == (False, False, ("0.0.0.0",))
    (lc,) = one(service(REDIRECT + "flags = IPv6")).listeners
    assert lc.addresses == ("0.0.0.0", "::")
    (lc,) = one(service(REDIRECT + "flags = IPv6\nv6only = yes")).listeners
    assert lc.addresses == ("::",)
    (lc,) = one(service(REDIRECT + "flags = IPv6\nflags += NODELAY\nbind = ::1")).listeners
    assert (lc.addresses, lc.nodelay) == (("::1",), True)


def test_bind_and_interface() -> None:
    assert one(service(REDIRECT + "bind = 127.0.0.2")).listeners[0].addresses == ("127.0.0.2",)
    assert one(service(REDIRECT + "interface = ::1")).listeners[0].addresses == ("::1",)
    assert err(service(REDIRECT + "bind = 127.0.0.1 127.0.0.2")).line == 9


def test_user_group_first_wins() -> None:
    a = service(REDIRECT + "user = mail\ngroup = mail", name="a")
    b = service(REDIRECT.replace("4025", "4026") + "user = nobody", name="b")
    cfg = one(a + b)
    assert (cfg.user, cfg.group) == ("mail", "mail")


def test_duplicate_names_get_suffixes_and_same_bind_is_an_error() -> None:
    a = service(REDIRECT, name="svc")
    b = service(REDIRECT.replace("4025", "4026"), name="svc")
    assert [lc.name for lc in one(a + b).listeners] == ["svc", "svc-2"]
    e = err(a + a)
    assert "already used" in str(e) and e.line == 12


def test_ignored_attributes() -> None:
    body = REDIRECT + ("id = x\nlog_type = FILE /tmp/x.log\nlog_on_success = PID HOST\n"
                       "log_on_failure += USERID\nbanner_fail = /etc/banner\nmax_load = 2.5\n"
                       "server_args = -x\nserver = /usr/sbin/exim\nnice = 10\numask = 022")
    (lc,) = one(service(body)).listeners
    assert lc.port == 4025


# --- disabling --------------------------------------------------------------------------


def test_disable_and_disabled_and_enabled() -> None:
    a = service(REDIRECT, name="a")
    b = service(REDIRECT.replace("4025", "4026"), name="b")
    c = service(REDIRECT.replace("4025", "4027") + "disable = yes", name="c")
    assert [lc.name for lc in one(a + b + c).listeners] == ["a", "b"]
    head = "defaults\n{\ndisabled = a\n}\n"
    assert [lc.name for lc in one(head + a + b + c).listeners] == ["b"]
    head = "defaults\n{\nenabled = a c\n}\n"
    assert [lc.name for lc in one(head + a + b + c).listeners] == ["a"]
    e = err(c)
    assert "no enabled redirect service" in str(e)
    # the lists name service ids (default: the name)
    a_id = service(REDIRECT + "id = a-stream", name="a")
    head = "defaults\n{\ndisabled = a-stream\n}\n"
    assert [lc.name for lc in one(head + a_id + b).listeners] == ["b"]
    assert err(service(REDIRECT + "disable = maybe")).line == 9


def test_disabled_unsupported_service_is_silently_skipped() -> None:
    internal = service("type = INTERNAL\nsocket_type = dgram\nwait = yes\ndisable = yes",
                       name="echo")
    (lc,) = one(internal + service(REDIRECT)).listeners
    assert lc.name == "svc"


# --- unsupported constructs -------------------------------------------------------------


@pytest.mark.parametrize(("body", "line", "words"), [
    ("socket_type = stream\nwait = no\nuser = root\nserver = /usr/sbin/in.telnetd", 8,
     "server program"),
    ("socket_type = dgram\nwait = no\nredirect = 127.0.0.1 1", 5, "dgram"),
    ("socket_type = stream\nprotocol = udp\nwait = no\nredirect = 127.0.0.1 1", 6, "udp"),
    ("type = RPC\nsocket_type = stream\nwait = no\nredirect = 127.0.0.1 1", 5, "RPC"),
    ("type = INTERNAL\nsocket_type = stream\nwait = no", 5, "INTERNAL"),
    ("socket_type = stream\nwait = yes\nredirect = 127.0.0.1 1", 6, "wait = yes"),
    ("socket_type = stream\nwait = no\nredirect = 127.0.0.1 1\naccess_times = 2:00-8:00", 8,
     "access_times"),
    ("socket_type = stream\nwait = no\nredirect = 127.0.0.1 1\nflags = SENSOR", 8, "SENSOR"),
])
def test_unsupported(body: str, line: int, words: str, tmp_path: Path) -> None:
    text = "# header\n" + service(body + "\nport = 4025\ntype += UNLISTED")
    path = write(tmp_path, "svc", text)
    with pytest.raises(xinetd.Unsupported) as ei:
        xinetd.load(path)
    assert f"{path}:{line}:" in str(ei.value), str(ei.value)
    assert words in str(ei.value)
    # skipped: then nothing runnable is left
    with pytest.raises(ConfigError, match="no enabled redirect service"):
        xinetd.load(path, skip_unsupported=True)
    # next to a runnable service, the runnable one loads
    other = service(REDIRECT.replace("4025", "4099"), name="ok")
    cfg = xinetd.load(write(tmp_path, "two", text + other), skip_unsupported=True)
    assert [lc.name for lc in cfg.listeners] == ["ok"]


def test_skip_unsupported_logs(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = xinetd.load(str(DATA / "mixed"), skip_unsupported=True)
    assert [lc.name for lc in cfg.listeners] == ["smtp"]
    out = capsys.readouterr()
    assert "xinetd.skipped" in out.err + out.out
    assert "daytime" in out.err + out.out and "tftp" in out.err + out.out


# --- syntax errors ----------------------------------------------------------------------


def test_unknown_attribute() -> None:
    e = err(service(REDIRECT + "only_form = 127.0.0.1"))
    assert (e.file, e.line, e.key) == ("test.conf", 9, "only_form")
    assert "test.conf:9: only_form: unknown attribute" in str(e)


def test_missing_open_brace() -> None:
    e = err("service smtp\n\tsocket_type = stream\n}\n")
    assert e.line == 2 and "missing '{'" in str(e)


def test_missing_close_brace() -> None:
    e = err("service smtp\n{\nsocket_type = stream\n\nservice b\n{\n}\n")
    assert e.line == 5 and "missing '}'" in str(e)
    e = err("service smtp\n{\nsocket_type = stream\n")
    assert e.line == 1 and "missing '}'" in str(e)


@pytest.mark.parametrize(("text", "line"), [
    ("}\n", 1),
    ("frobnicate\n", 1),
    ("service\n{\n}\n", 1),
    ("service a b\n{\n}\n", 1),
    ("defaults x\n{\n}\n", 1),
    ("\n\nservice a\n{\nport 25\n}\n", 5),
    ("service a\n{\nport += 25\n}\n", 3),
    ("service a\n{\ndisabled = a\n}\n", 3),
    ("defaults\n{\nredirect = 127.0.0.1 1\n}\n", 3),
    ("include\n", 1),
    ("includedir /nonexistent/dir\n", 1),
    ("include /nonexistent/file\n", 1),
])
def test_syntax_errors(text: str, line: int) -> None:
    assert err(text).line == line


def test_redirect_errors() -> None:
    for bad in ("redirect = 127.0.0.1", "redirect = 127.0.0.1 0", "redirect = bad!host 25",
                "redirect = 127.0.0.1 25 26"):
        body = REDIRECT.replace("redirect = 127.0.0.1 8025\n", "") + bad
        assert err(service(body)).line == 8, bad


def test_trailing_hash_is_not_a_comment_as_in_xinetd() -> None:
    e = err(service(REDIRECT + "bind = 127.0.0.1 # loopback"))
    assert e.line == 9 and "one value" in str(e)


# --- include / includedir / directories -------------------------------------------------


def test_includedir_skips_dotted_and_backup_names(tmp_path: Path) -> None:
    d = tmp_path / "xinetd.d"
    d.mkdir()
    (d / "a").write_text(service(REDIRECT, name="a"))
    (d / "b.rpmsave").write_text("garbage {{{")
    (d / "c~").write_text("garbage {{{")
    (d / "sub").mkdir()
    main = write(tmp_path, "xinetd.conf", DEFAULTS + "includedir xinetd.d\n")
    cfg = xinetd.load(main)
    assert [lc.name for lc in cfg.listeners] == ["a"]
    assert cfg.listeners[0].access.instances == 30
    assert [lc.name for lc in xinetd.load(str(d)).listeners] == ["a"]


def test_include_file_errors_name_the_included_file(tmp_path: Path) -> None:
    inc = write(tmp_path, "inc", service(REDIRECT + "bogus = 1"))
    main = write(tmp_path, "main", f"# main\ninclude {inc}\n")
    with pytest.raises(ConfigError) as ei:
        xinetd.load(main)
    assert (ei.value.file, ei.value.line) == (inc, 9)


def test_include_loop_is_bounded(tmp_path: Path) -> None:
    write(tmp_path, "loop", "include loop\n")
    with pytest.raises(ConfigError, match="nested deeper"):
        xinetd.load(str(tmp_path / "loop"))


def test_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        xinetd.load(str(tmp_path / "missing"))
    assert ei.value.file == str(tmp_path / "missing")


# --- corpus -----------------------------------------------------------------------------


def corpus() -> list[Path]:
    return [*sorted(p for p in DATA.rglob("*") if p.is_file()), DATA, DATA / "conf.d",
            DATA / "debian"]


@pytest.mark.parametrize("path", corpus(), ids=lambda p: str(p.relative_to(DATA)) or ".")
@pytest.mark.parametrize("skip", [False, True])
def test_corpus_loads_or_config_error(path: Path, skip: bool) -> None:
    try:
        cfg = xinetd.load(str(path), skip_unsupported=skip)
    except ConfigError as e:
        assert e.file is not None
        return
    assert cfg.listeners
    roundtrip(cfg)


def test_corpus_expectations() -> None:
    cfg = xinetd.load(str(DATA / "xinetd.conf"))
    by = {lc.name: lc for lc in cfg.listeners}
    assert set(by) == {"smtp", "submission"}  # legacy is in `disabled`
    assert by["smtp"].access.only_from[-3:] == ("192.168.1.10/32", "192.168.1.11/32",
                                                 "192.168.1.12/32")
    assert by["smtp"].nodelay and by["smtp"].keepalive
    assert by["submission"].access == AccessConfig(only_from=("0.0.0.0/0",),
                                                   no_access=("10.0.0.66/32",), cps=Cps(25, 30))
    with pytest.raises(ConfigError, match="no enabled redirect service"):
        xinetd.load(str(DATA / "debian-xinetd.conf"))


def test_stock_debian_files_when_installed() -> None:
    if not Path("/etc/xinetd.d").is_dir():
        pytest.skip("xinetd is not installed")
    for p in [Path("/etc/xinetd.d"), *sorted(Path("/etc/xinetd.d").iterdir())]:
        for skip in (False, True):
            try:
                xinetd.load(str(p), skip_unsupported=skip)
            except ConfigError:
                pass


# --- properties -------------------------------------------------------------------------


_fuzz_chars = st.characters()


def check_total(text: str) -> None:
    """A Config or a ConfigError, nothing else; an error's message is printable whatever
    the file held; a Config prints to TOML that reads back the same, and says only what
    the text said."""
    try:
        cfg = xinetd.parse_text(text, "/nonexistent-dir/fuzz.conf", skip_unsupported=True)
    except ConfigError as e:
        event("ConfigError")
        assert str(e).isprintable(), repr(str(e))
        return
    event("Config")
    roundtrip(cfg)
    says_what_it_said(text, cfg)


_WRITTEN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(?:\+=|-=|=)\s*(.*)$")


def _written(text: str) -> dict[str, list[list[str]]]:
    """Attribute -> the values of each line that sets it, anywhere in the text."""
    out: dict[str, list[list[str]]] = {}
    for line in text.split("\n"):
        m = _WRITTEN.match(line.strip(" \t"))
        if m:
            out.setdefault(m.group(1), []).append(m.group(2).split())
    return out


def _as_networks(entry: str) -> set[str]:
    """What one only_from / no_access entry stands for, after xinetd.conf(5): a numeric
    IPv4 address whose trailing zero parts are wildcards, one with {a,b} factorized last
    parts, a CIDR network or IPv6 address, else a host name."""
    def v4(parts: list[str]) -> str:
        nums = [int(x) for x in parts] + [0] * (4 - len(parts))
        keep = max((i + 1 for i, n in enumerate(nums) if n), default=0)
        return str(ipaddress.ip_network(f"{'.'.join(map(str, nums))}/{8 * keep}"))

    try:
        m = re.fullmatch(r"((?:[0-9]+\.){1,3})\{([0-9,]+)\}", entry)
        if m:
            head = m.group(1).rstrip(".").split(".")
            return {v4([*head, x]) for x in m.group(2).split(",") if x}
        if re.fullmatch(r"[0-9]+(\.[0-9]+){0,3}", entry):
            return {v4(entry.split("."))}
        return {str(ipaddress.ip_network(entry, strict=False))}
    except ValueError:
        return {entry}


def says_what_it_said(text: str, cfg: Config) -> None:
    """Each listener's redirect, port, addresses, access lists, limits and flags are ones
    the text wrote (soundness: nothing made up, nothing taken from the wrong attribute)."""
    w = _written(text)

    def wrote(attr: str, *values: str) -> bool:
        return [*values] in w.get(attr, [])

    def has_service(name: str) -> bool:
        return re.search(rf"^[ \t]*service[ \t]+{re.escape(name)}[ \t]*({{[ \t]*)?$", text,
                         re.M) is not None

    for lc in cfg.listeners:
        name = lc.name  # or NAME-2, NAME-3 ... for the second, third service called NAME
        if not has_service(name):
            name = re.sub(r"-[0-9]+$", "", lc.name)
        assert has_service(name), lc.name
        (b,) = lc.backends
        ep = b.endpoint
        assert any(len(v) == 2 and v[0] in (ep.host, f"[{ep.host}]") and v[1].isdigit()
                   and int(v[1]) == ep.port for v in w.get("redirect", [])), ep
        assert any(len(v) == 1 and v[0].isdigit() and int(v[0]) == lc.port
                   for v in w.get("port", [])) or _service_port(name) == lc.port, lc.port
        for a in lc.addresses:
            assert a in ("0.0.0.0", "::") or any(
                v in ([a], [f"[{a}]"]) for attr in ("bind", "interface")
                for v in w.get(attr, [])), a
        for attr in ("only_from", "no_access"):
            possible = {n for v in w.get(attr, []) for e in v for n in _as_networks(e)}
            if attr == "no_access" and "only_from" in w:  # `only_from =`: nobody
                possible |= {"0.0.0.0/0", "::/0"}
            for entry in getattr(lc.access, attr):
                assert entry in possible, (attr, entry, w.get(attr))
        for attr in ("instances", "per_source"):
            n = getattr(lc.access, attr)
            assert n is None or any(len(v) == 1 and v[0].isdigit() and int(v[0]) == n
                                    for v in w.get(attr, [])), (attr, n)
        if lc.access.cps:
            c = lc.access.cps
            assert any(len(v) == 2 and all(x.isdigit() for x in v)
                       and (int(v[0]), float(v[1])) == (c.rate, c.pause)
                       for v in w.get("cps", [])), c
        flags = {f.upper() for v in w.get("flags", []) for f in v}
        assert not lc.nodelay or "NODELAY" in flags
        assert not lc.keepalive or "KEEPALIVE" in flags
        assert lc.mode == ("smtp" if name == "smtp" or lc.port == 25 else "tcp")
    for attr in ("user", "group"):
        v = getattr(cfg, attr)
        assert v is None or wrote(attr, v), (attr, v)


def _service_port(name: str) -> int | None:
    try:
        return socket.getservbyname(name, "tcp")
    except (OSError, UnicodeError, ValueError):
        return None


WORDS = ["service", "defaults", "{", "}", "=", "+=", "-=", "#", "redirect", "port", "bind",
         "only_from", "no_access", "instances", "per_source", "cps", "flags", "IPv6",
         "NODELAY", "UNLIMITED", "UNLISTED", "type", "socket_type", "stream", "wait", "no",
         "yes", "disable", "127.0.0.1", "0.0.0.0", "10.0.0.{1,2}", "::1", "25", "8025", "0",
         "smtp", "\n", "\n", "\n", " ", "\t", "user", "nobody", "include", "x"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(_fuzz_chars, max_size=400))
def test_arbitrary_text_is_config_or_config_error(text: str) -> None:
    check_total(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(WORDS), max_size=80))
def test_token_soup_is_config_or_config_error(words: list[str]) -> None:
    check_total(" ".join(words))


VALID = [(DATA / n).read_text() for n in ("smtp", "mixed", "ipv6-proxy", "brace-same-line")]
VALID.append(DEFAULTS + service(REDIRECT + "only_from += 10.0.0.{1,2}\ncps = 5 2"))


@st.composite
def mutated(draw: st.DrawFn) -> str:
    lines = draw(st.sampled_from(VALID)).splitlines()
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "duplicate", "replace", "insert", "swap",
                                     "truncate"]))
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        if kind == "delete":
            del lines[i]
        elif kind == "duplicate":
            lines.insert(i, lines[i])
        elif kind == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "truncate":
            lines[i] = lines[i][:draw(st.integers(0, len(lines[i])))]
        elif kind == "insert":
            lines.insert(i, " ".join(draw(st.lists(st.sampled_from(WORDS), max_size=6))))
        else:
            pos = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:pos] + draw(st.text(_fuzz_chars, max_size=5)) + \
                lines[i][pos + 1:]
    return "\n".join(lines)


@settings(max_examples=300, deadline=None)
@given(mutated())
def test_mutated_valid_files_are_config_or_config_error(text: str) -> None:
    check_total(text)


# A service generated from known values, written out in xinetd's syntax with varying
# layout, some of it in `defaults`: the listener read back is exactly what was written.
_ENTRIES = {  # entry as written -> what it stands for
    "10.1.2.3": ("10.1.2.3/32",), "10.7.0.0": ("10.7.0.0/16",),
    "172.16.0.0": ("172.16.0.0/16",), "192.168.1.0/25": ("192.168.1.0/25",),
    "10.9.9.{1,2}": ("10.9.9.1/32", "10.9.9.2/32"), "::1": ("::1/128",),
    "2001:db8::/32": ("2001:db8::/32",), "relay.example.org": ("relay.example.org",),
    "0.0.0.0": ("0.0.0.0/0",),
}


def defaults_of(ops: list[tuple[str, str, list[str]]]) -> set[str]:
    return {k for k, _, _ in ops}


@st.composite
def written_service(draw: st.DrawFn) -> tuple[str, Config]:
    name = draw(st.sampled_from(["svc", "relay", "mail-in", "x25"]))
    port = draw(st.integers(1, 65535))
    rhost = draw(st.sampled_from(["127.0.0.1", "10.1.2.3", "::1", "backend.example.org"]))
    rport = draw(st.integers(1, 65535))
    only = draw(st.lists(st.sampled_from(sorted(_ENTRIES)), max_size=4, unique=True))
    deny = draw(st.lists(st.sampled_from(sorted(_ENTRIES)), max_size=3, unique=True))
    instances = draw(st.none() | st.integers(1, 10**6))
    per_source = draw(st.none() | st.integers(1, 1000))
    cps = draw(st.none() | st.tuples(st.integers(1, 1000), st.integers(1, 3600)))
    flags = draw(st.lists(st.sampled_from(["NODELAY", "KEEPALIVE", "REUSE", "NORETRY",
                                           "IPv4", "IPv6", "nodelay"]), unique=True))
    bind = draw(st.none() | st.sampled_from(["127.0.0.2", "::1", "[::1]"]))
    user = draw(st.none() | st.sampled_from(["nobody", "mail"]))
    in_defaults = draw(st.sets(st.sampled_from(["only_from", "no_access", "instances",
                                                "per_source", "cps", "flags", "bind"])))
    eq = draw(st.sampled_from(["=", " = ", "\t=\t", "  =  "]))
    indent = draw(st.sampled_from(["", "\t", "    "]))
    sep = draw(st.sampled_from([" ", "\t", "  "]))

    attrs: dict[str, list[str]] = {}
    if only:
        attrs["only_from"] = only
    if deny:
        attrs["no_access"] = deny
    for k, v in (("instances", instances), ("per_source", per_source)):
        if v is not None:
            attrs[k] = [str(v)]
    if cps:
        attrs["cps"] = [str(cps[0]), str(cps[1])]
    if flags:
        attrs["flags"] = flags
    if bind:
        attrs["bind"] = [bind]
    defaults = [(k, "=", v) for k, v in attrs.items() if k in in_defaults]
    own = [(k, "=", v) for k, v in attrs.items() if k not in in_defaults]
    own += [("type", "=", ["UNLISTED"]), ("port", "=", [str(port)]),
            ("socket_type", "=", ["stream"]), ("wait", "=", ["no"]),
            ("redirect", "=", [rhost, str(rport)])]
    if user:
        own.append(("user", "=", [user]))
    for k in ("only_from", "no_access"):  # a service adds to and takes from the defaults'
        if k in defaults_of(defaults):
            base = attrs[k]
            add = draw(st.lists(st.sampled_from(sorted(set(_ENTRIES) - set(base))),
                                max_size=2, unique=True))
            drop = draw(st.lists(st.sampled_from(base), max_size=len(base), unique=True))
            if add:
                own.append((k, "+=", add))
            if drop:
                own.append((k, "-=", drop))
            attrs[k] = [e for e in base if e not in drop] + add

    def block(head: str, ops: list[tuple[str, str, list[str]]]) -> str:
        lines = [f"{indent}{k}{eq.replace('=', op)}{sep.join(v)}" for k, op, v in ops]
        return f"{head}\n{{\n" + "\n".join(lines) + "\n}\n"

    text = ("# generated\n" + (block("defaults", defaults) if defaults else "")
            + "\n" + block(f"service {name}", draw(st.permutations(own))))

    up = {f.upper() for f in flags}
    mode: Mode = "smtp" if port == 25 else "tcp"
    nets = {k: tuple(dict.fromkeys(n for e in attrs.get(k, []) for n in _ENTRIES[e]))
            for k in ("only_from", "no_access")}
    if "only_from" in attrs and not nets["only_from"]:  # all taken away: nobody may connect
        nets["no_access"] = tuple(dict.fromkeys([*nets["no_access"], "0.0.0.0/0", "::/0"]))
    addresses = ((bind.strip("[]"),) if bind else ("0.0.0.0", "::") if "IPV6" in up
                 else ("0.0.0.0",))
    lc = ListenerConfig(
        name=name, addresses=addresses, port=port,
        backends=(BackendConfig(Endpoint(rhost, rport), priority=0, local=True),), mode=mode,
        probe=ProbeConfig(kind=mode),
        access=AccessConfig(only_from=nets["only_from"], no_access=nets["no_access"],
                            instances=instances, per_source=per_source,
                            cps=Cps(cps[0], float(cps[1])) if cps else None),
        reuse_port=False, nodelay="NODELAY" in up, keepalive="KEEPALIVE" in up)
    return text, Config(listeners=(lc,), user=user, source="gen.conf")


@settings(max_examples=300, deadline=None)
@given(written_service())
def test_written_service_reads_as_written(case: tuple[str, Config]) -> None:
    text, expected = case
    cfg = xinetd.parse_text(text, "gen.conf")
    assert cfg == expected, text
    says_what_it_said(text, cfg)
    roundtrip(cfg)


# --- characters: as xinetd reads them -------------------------------------------------
# Real xinetd 2.3.15 counts lines by \n only, separates values by C's blanks only, and reads
# ASCII digits only (Python's splitlines(), split() and isdigit() take far more).


def test_form_feed_is_not_a_line_break() -> None:
    assert err("\f\nservice a\n{\nbogus = 1\n}\n").line == 4


def test_no_break_space_does_not_separate_values() -> None:
    err(service(REDIRECT + "only_from = 10.0.0.1\u00a010.0.0.2"))


@pytest.mark.parametrize("body", [
    pytest.param(REDIRECT.replace("8025", "\u00b2"), id="superscript-two"),
    pytest.param(REDIRECT.replace("4025", "\u0664\u0660\u0662\u0665"), id="arabic-port"),
    pytest.param(REDIRECT + "only_from = \u0661.\u0662.\u0663.\u0664", id="arabic-address"),
])
def test_non_ascii_digits_are_config_errors(body: str) -> None:
    err(service(body))


# --- messages ---------------------------------------------------------------------------


def test_a_file_too_large_is_named_once(tmp_path: Path) -> None:
    big = tmp_path / "xi-comments"
    big.write_bytes(b"#" * (xinetd.MAX_FILE_SIZE + 1))
    with pytest.raises(ConfigError) as ei:
        xinetd.load(str(big))
    assert str(ei.value) == f"{big}: larger than {xinetd.MAX_FILE_SIZE} bytes"
    # named by an include line: the error is that line's, the message names the file
    main = write(tmp_path, "main", f"# main\ninclude {big}\n")
    with pytest.raises(ConfigError) as ei:
        xinetd.load(main)
    assert str(ei.value) == f"{main}:2: {big}: larger than {xinetd.MAX_FILE_SIZE} bytes"


def test_an_unreadable_path_is_named_once(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError) as ei:
        xinetd.load(str(missing))
    assert str(ei.value) == f"{missing}: cannot read: No such file or directory"
    main = write(tmp_path, "main", f"includedir {missing}\n")
    with pytest.raises(ConfigError) as ei:
        xinetd.load(main)
    assert str(ei.value) == f"{main}:1: {missing}: cannot read directory: No such file or " \
                            "directory"


JUNK = "\x1b[2J\x1b]0;owned\x07\x9b"  # clear screen, set the title, bell, C1 CSI


@pytest.mark.parametrize("text", [
    JUNK + "\n",
    service(REDIRECT.replace("stream", JUNK)),
    service(REDIRECT + f"protocol = {JUNK}"),
    service(REDIRECT + f"bind = {JUNK}"),
    service(REDIRECT + f"only_from = 10.0.0.1 {JUNK}"),
    service(REDIRECT + f"flags = IPv6\nv6only = {JUNK}"),
    service(REDIRECT + f"user = {JUNK}"),
    service(REDIRECT + f"instances = {JUNK}"),
    service(REDIRECT.replace("8025", JUNK)),
    service(REDIRECT, name=JUNK),
    f"include {JUNK}\n",
    f"includedir {JUNK}\n",
    f"include {JUNK}\x00\n",  # a NUL: no such path can exist (was a ValueError)
    f"includedir {JUNK}\x00\n",
    f"defaults {JUNK}\n{{\n}}\n",
    f"\x00{JUNK}\n",
], ids=["top", "socket_type", "protocol", "bind", "only_from", "v6only", "user", "instances",
        "redirect", "service-name", "include", "includedir", "include-nul", "includedir-nul",
        "defaults", "nul"])
def test_messages_escape_what_the_file_holds(tmp_path: Path, text: str) -> None:
    """Binary junk quoted from a file reaches the terminal escaped, never raw."""
    path = tmp_path / "junk"
    path.write_text(text)
    with pytest.raises(ConfigError) as ei:
        xinetd.load(str(path))
    msg = str(ei.value)
    assert msg.isprintable(), repr(msg)
    assert "\\x1b" in msg, msg  # the junk is there, escaped
    assert msg.startswith(f"{path}:"), msg


# --- CLI --------------------------------------------------------------------------------


def test_convert_xinetd_output_passes_check_config(tmp_path: Path) -> None:
    for src in (DATA / "xinetd.conf", DATA / "smtp", DATA / "ipv6-proxy"):
        r = run_cli("convert-xinetd", str(src))
        assert r.returncode == 0, r.stderr
        toml = tmp_path / f"{src.name}.toml"
        toml.write_text(r.stdout)
        c = run_cli("check-config", str(toml))
        assert c.returncode == 0, c.stderr
        assert parse_toml(r.stdout).listeners == xinetd.load(str(src)).listeners


def test_convert_xinetd_skip_unsupported_keeps_stdout_clean(tmp_path: Path) -> None:
    r = run_cli("convert-xinetd", str(DATA / "mixed"))
    assert r.returncode == 2
    assert f"{DATA / 'mixed'}:12:" in r.stderr
    r = run_cli("convert-xinetd", "--skip-unsupported", str(DATA / "mixed"))
    assert r.returncode == 0, r.stderr
    assert "xinetd.skipped" in r.stderr
    assert [lc.name for lc in parse_toml(r.stdout).listeners] == ["smtp"]


def test_check_config_xinetd_flag() -> None:
    r = run_cli("check-config", "--xinetd", str(DATA / "bad-unknown-attribute"))
    assert r.returncode == 2
    assert "bad-unknown-attribute:5: only_form: unknown attribute" in r.stderr

