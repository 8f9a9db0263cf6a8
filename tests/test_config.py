"""Config: every bad input names file, line and key; nothing else ever escapes."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forwarder.config.model import ConfigError
from forwarder.config.toml import load_toml, parse_toml, to_toml

from .helpers import run_cli

GOOD = """\
user = "nobody"
admin = "127.0.0.1:9125"

[[listener]]
name = "smtp"
addresses = ["127.0.0.1", "::1"]
port = 2525
mode = "smtp"
backend = "127.0.0.1:8025"

[listener.probe]
kind = "smtp"
interval = 2
"""

# (name, text, key in the message, line)
BAD = [
    ("unknown key", GOOD.replace('mode = "smtp"', 'mode = "smtp"\nmood = "happy"'),
     "listener.0.mood", 9),
    ("unknown top key", "colour = 1\n" + GOOD, "colour", 1),
    ("bad port", GOOD.replace("port = 2525", "port = 70000"), "listener.0.port", 7),
    ("port not int", GOOD.replace("port = 2525", 'port = "25"'), "listener.0.port", 7),
    ("bad address", GOOD.replace('"::1"', '"not an address!"'), "listener.0.addresses", 6),
    ("bad backend", GOOD.replace('"127.0.0.1:8025"', '"127.0.0.1"'), "listener.0.backend", 9),
    ("negative interval", GOOD.replace("interval = 2", "interval = -1"),
     "listener.0.probe.interval", 13),
    ("missing backend", GOOD.replace('backend = "127.0.0.1:8025"\n', ""),
     "listener.0.backend", None),
    ("bad mode", GOOD.replace('mode = "smtp"', 'mode = "udp"'), "listener.0.mode", 8),
    ("bad probe kind", GOOD.replace('kind = "smtp"', 'kind = "http"'),
     "listener.0.probe.kind", 12),
    ("zero rise", GOOD + "rise = 0\n", "listener.0.probe.rise", 14),
    ("bad admin", GOOD.replace("127.0.0.1:9125", "localhost"), "admin", 2),
    ("no listener", 'user = "nobody"\n', "listener", None),
    ("bad cps", GOOD + "[listener.access]\ncps = [0, 10]\n", "listener.0.access.cps", 15),
    ("bad only_from", GOOD + "[listener.access]\nonly_from = ['10.0.0.0/33x']\n",
     "listener.0.access.only_from.0", 15),
    ("duplicate bind", GOOD + GOOD[GOOD.index("[[listener]]"):].replace('"smtp"\n', '"b"\n', 1),
     "listener.1.addresses", None),
]


@pytest.mark.parametrize("name,text,key,line", BAD, ids=[b[0] for b in BAD])
def test_bad_config_names_key_and_line(tmp_path: Path, name: str, text: str, key: str,
                                       line: int | None) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_toml(f)
    e = ei.value
    assert e.key == key, str(e)
    assert e.file == str(f)
    if line is not None:
        assert e.line == line, str(e)
        assert f"{f}:{line}: {key}: " in str(e)


@pytest.mark.parametrize("name,text,key,line", BAD[:6], ids=[b[0] for b in BAD[:6]])
def test_check_config_cli_exits_nonzero_with_key(tmp_path: Path, name: str, text: str,
                                                 key: str, line: int | None) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    r = run_cli("check-config", str(f))
    assert r.returncode == 2
    assert key in r.stderr and str(f) in r.stderr
    # and `run` refuses the same file the same way, before binding anything
    r = run_cli("run", "--config", str(f))
    assert r.returncode == 2 and key in r.stderr


def test_toml_syntax_error_has_line(tmp_path: Path) -> None:
    f = tmp_path / "syntax.toml"
    f.write_text(GOOD + "[[listener]\n")
    with pytest.raises(ConfigError) as ei:
        load_toml(f)
    assert ei.value.line == 14


def test_cli_flag_errors_name_the_flag() -> None:
    r = run_cli("--listen", "127.0.0.1", "--backend", "127.0.0.1:8025")
    assert r.returncode == 2 and "--listen" in r.stderr
    r = run_cli("--listen", "127.0.0.1:2525")
    assert r.returncode == 2 and "--backend" in r.stderr


def test_good_config_round_trips_through_check_config(tmp_path: Path) -> None:
    f = tmp_path / "good.toml"
    f.write_text(GOOD)
    cfg = load_toml(f)
    assert cfg.listeners[0].addresses == ("127.0.0.1", "::1")
    assert cfg.listeners[0].backends[0].local
    r = run_cli("check-config", str(f))
    assert r.returncode == 0, r.stderr
    again = parse_toml(r.stdout, "printed")
    assert again.listeners == cfg.listeners
    assert parse_toml(to_toml(again)).listeners == cfg.listeners


def test_example_config_is_valid() -> None:
    from .helpers import ROOT
    for f in sorted((ROOT / "deploy" / "examples").glob("*.toml")):
        cfg = load_toml(f)
        assert cfg.listeners, f


toml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 70000) | st.floats(allow_nan=True) |
    st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) |
    st.dictionaries(st.sampled_from(["port", "address", "backend", "probe", "kind", "listener",
                                     "addresses", "interval", "access", "cps", "x"]),
                    children, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_gives_config_or_config_error(text: str) -> None:
    try:
        parse_toml(text)
    except ConfigError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["listener", "user", "admin", "log", "drain_timeout"]),
                       toml_values, max_size=4),
       st.lists(st.dictionaries(st.sampled_from(
           ["name", "address", "addresses", "port", "backend", "backends", "mode", "probe",
            "access", "discovery", "gate", "send_proxy", "idle_timeout"]), toml_values,
           max_size=6), max_size=2))
def test_arbitrary_structures_give_config_or_config_error(top: dict[str, object],
                                                         listeners: list[dict[str, object]]
                                                         ) -> None:
    from forwarder.config.toml import _config_from_dict
    data = dict(top)
    if listeners:
        data["listener"] = listeners
    try:
        _config_from_dict(data, {}, "<hypothesis>")
    except ConfigError as e:
        assert e.key or e.message
