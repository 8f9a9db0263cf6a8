"""The README's first example, as a new user runs it: deploy/examples/example.toml."""

from __future__ import annotations

import smtplib

from forwarder.config.toml import load_toml

from .helpers import ROOT, Forwarder, SmtpBackend, connect_result, run_cli, wait_port

EXAMPLE = ROOT / "deploy" / "examples" / "example.toml"


def test_example_config_gates_on_the_backend() -> None:
    cfg = load_toml(EXAMPLE)
    lc = cfg.listeners[0]
    host, port = lc.addresses[0], lc.port
    backend = lc.backends[0].endpoint
    assert (host, port, backend.port) == ("127.0.0.1", 2525, 8025)
    fw = Forwarder(EXAMPLE.read_text())
    with fw:
        assert connect_result(host, port) == "refused"
        with SmtpBackend(backend.port, backend.host) as be:
            # "accepts within two probe intervals"
            t = wait_port(host, port, "open", timeout=2 * lc.probe.interval * 1.2 + 1)
            assert t <= 2 * lc.probe.interval * (1 + lc.probe.jitter) + 0.5
            with smtplib.SMTP(host, port, timeout=10) as c:
                c.sendmail("new@user.example", ["mail@backend.example"],
                           "Subject: example\r\n\r\nit works\r\n")
            assert b"it works" in be.wait_messages(1)[0]["data"]
        wait_port(host, port, "refused", timeout=2 * lc.probe.interval + 2)


def test_every_shipped_example_passes_check_config() -> None:
    examples = sorted((ROOT / "deploy" / "examples").glob("*.toml"))
    assert len(examples) >= 4
    for ex in examples:
        r = run_cli("check-config", str(ex))
        assert r.returncode == 0, (ex, r.stderr)
