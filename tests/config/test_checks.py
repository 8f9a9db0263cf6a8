"""One test per shared config rule (config/checks.py, config/load.py), through the real
`forwarder check-config`: rc 2 and a message naming file, line and key as written."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import free_port, run_cli


def check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    f = tmp_path / "f.toml"
    f.write_text(text)
    return run_cli("check-config", str(f))


def listener(name: str, port: int, address: str = '"127.0.0.1"', backend: int = 8025,
             key: str = "address") -> str:
    return f"""
[[listener]]
name = "{name}"
{key} = {address}
port = {port}
backend = "127.0.0.1:{backend}"
"""


def test_duplicate_listener_names_are_rejected_at_the_second_name(tmp_path: Path) -> None:
    r = check(tmp_path, listener("smtp", free_port()) + listener("smtp", free_port()))
    assert r.returncode == 2
    assert ":9: listener.1.name: duplicate listener name 'smtp'" in r.stderr, r.stderr


def test_overlapping_addresses_on_one_port_are_rejected(tmp_path: Path) -> None:
    port = free_port()
    r = check(tmp_path, listener("a", port, '["0.0.0.0", "127.0.0.1"]', key="addresses"))
    assert r.returncode == 2
    assert (f"listener.0.addresses: 127.0.0.1:{port} overlaps 0.0.0.0:{port} of this "
            "listener") in r.stderr, r.stderr
    # across listeners too, wildcard either way round; other families do not overlap
    r = check(tmp_path, listener("a", port) + listener("b", port, '"0.0.0.0"'))
    assert r.returncode == 2 and "listener.1.address:" in r.stderr and "'a'" in r.stderr
    ok = check(tmp_path, listener("a", port, '["0.0.0.0", "::"]', key="addresses"))
    assert ok.returncode == 0, ok.stderr


def test_admin_on_a_listeners_address_is_rejected(tmp_path: Path) -> None:
    port = free_port()
    r = check(tmp_path, f'admin = "127.0.0.1:{port}"\n' + listener("smtp", port, '"0.0.0.0"'))
    assert r.returncode == 2
    assert f":1: admin: 127.0.0.1:{port} overlaps 0.0.0.0:{port} of listener 'smtp'" \
        in r.stderr, r.stderr


def test_a_backend_that_is_our_own_listen_address_is_rejected(tmp_path: Path) -> None:
    port = free_port()
    text = listener("smtp", port, '"0.0.0.0"') + 'gate = "any"\n' + f"""
[[listener.backends]]
address = "localhost:{port}"
"""
    r = check(tmp_path, text)
    assert r.returncode == 2
    assert f":10: listener.0.backends.0.address: localhost:{port} is this forwarder's own " \
           "listening address" in r.stderr, r.stderr


def test_bad_address_names_the_line_and_the_key_as_written(tmp_path: Path) -> None:
    r = check(tmp_path, '\n\n[[listener]]\nname = "x"\nport = 2525\naddress = "999.1.1.1"\n'
                        'backend = "127.0.0.1:8025"\n')
    assert r.returncode == 2
    assert "f.toml:6: listener.0.address: not an IP address or host name" in r.stderr, r.stderr


def test_probe_timeout_longer_than_interval_is_a_warning(tmp_path: Path) -> None:
    r = check(tmp_path, listener("smtp", free_port()) + "[listener.probe]\ninterval = 1\n"
                                                        "timeout = 3\n")
    assert r.returncode == 0
    assert "warning" in r.stderr and ":9: listener.0.probe.timeout: 3s is longer than the " \
                                       "interval (1s)" in r.stderr, r.stderr


def test_removed_protocol_relay_is_a_clear_error(tmp_path: Path) -> None:
    r = check(tmp_path, listener("smtp", free_port()) + 'relay = "protocol"\n')
    assert r.returncode == 2 and "listener.0.relay: the asyncio protocol relay was removed" \
        in r.stderr, r.stderr


def test_dev_zero_is_not_read_and_a_fifo_does_not_hang(tmp_path: Path) -> None:
    r = run_cli("check-config", "/dev/zero", timeout=10)
    assert r.returncode == 2 and "/dev/zero: not a regular file" in r.stderr, r.stderr
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = run_cli("check-config", str(fifo), timeout=10)
    assert r.returncode == 2 and "not a regular file" in r.stderr, r.stderr
    big = tmp_path / "big.toml"
    with open(big, "wb") as f:
        f.truncate(2 << 20)
    r = run_cli("check-config", str(big), timeout=10)
    assert r.returncode == 2 and "larger than 1048576 bytes" in r.stderr, r.stderr


@pytest.mark.parametrize("form", ["positional", "--config"])
def test_check_config_and_run_take_the_file_both_ways(tmp_path: Path, form: str) -> None:
    f = tmp_path / "f.toml"
    f.write_text(listener("smtp", free_port()))
    args = [str(f)] if form == "positional" else ["--config", str(f)]
    r = run_cli("check-config", *args)
    assert r.returncode == 0, r.stderr
    # `run` reads the same file the same way: a bad one fails before binding anything
    f.write_text(listener("smtp", free_port()) + "mood = 1\n")
    r = run_cli("run", *args)
    assert r.returncode == 2 and "listener.0.mood: unknown key" in r.stderr, r.stderr


def test_no_arguments_prints_usage() -> None:
    r = run_cli()
    assert r.returncode == 2
    assert "usage: forwarder --listen ADDR:PORT --backend HOST:PORT" in r.stderr, r.stderr
