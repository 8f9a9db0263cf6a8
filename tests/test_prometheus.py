"""Metrics against a real Prometheus: promtool checks, the alert rules' unit tests, and a
live scrape of a running forwarder through a scenario, after which every dashboard query,
dashboard variable and alert expression is evaluated by Prometheus itself.

No sleeps: each phase of the scenario waits (bounded) until Prometheus has stored samples
that show it, read back through its query API."""

from __future__ import annotations

import json
import math
import re
import shutil
import smtplib
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from .conftest import need_tool
from .helpers import (
    ROOT,
    SmtpBackend,
    connect_result,
    forwarder,
    free_port,
    toml_listener,
    wait_port,
    wait_until,
)

DEPLOY = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "dashboards" / "forwarder.json"
MAILS = 20

# Families the live scenario cannot make the forwarder emit a sample for (they count
# failures it does not provoke, or need a DNS-discovered listener).  A dashboard query may
# come back empty only if it reads one of these; every other family must have samples.
EVENT_ONLY = {
    "forwarder_gate_open_failures_total": "no listen() failure (another process on the port)",
    "forwarder_accept_errors_total": "no accept() failure (EMFILE, ...)",
    "forwarder_dns_peers": "no DNS-discovered backend",
    "forwarder_dns_lookups_total": "no DNS-discovered backend",
}
# Alerts that must stay quiet through this healthy scenario (their expression is empty).
QUIET = ("ForwarderInternalErrors", "ForwarderGateOpenFailing", "ForwarderDown")


def get_json(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def test_promtool_rules_check_and_unit_tests() -> None:
    promtool = need_tool("promtool")
    r = subprocess.run([promtool, "check", "rules", "alerts.yml"], cwd=DEPLOY,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=DEPLOY,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=DEPLOY,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_has_a_unit_test_and_an_actionable_summary() -> None:
    tests = yaml.safe_load((DEPLOY / "alerts_test.yml").read_text())
    tested = {t["alertname"] for group in tests["tests"] for t in group["alert_rule_test"]
              if t.get("exp_alerts")}
    for name, rule in _alert_rules().items():
        assert name in tested, f"{name}: no promtool test where it fires"
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert "for" in rule, name
        assert rule["annotations"]["summary"], name


def test_promtool_check_metrics_on_live_output() -> None:
    promtool = need_tool("promtool")
    port, admin = free_port(), free_port()
    with SmtpBackend() as be, \
            forwarder(toml_listener(port, be.port, top=f'admin = "127.0.0.1:{admin}"')) as fw:
        fw.wait_event("gate.open")
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
            c.sendmail("a@x.example", ["b@y.example"], "Subject: m\r\n\r\nbody\r\n")
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
            text = r.read()
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                         timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert b"forwarder_splice_bytes_total" in text


def _dashboard() -> dict[str, Any]:
    d: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return d


def _dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expression) for every query of every panel."""
    return [(p["title"], t["expr"]) for p in _dashboard()["panels"] for t in p["targets"]]


def _alert_rules() -> dict[str, dict[str, Any]]:
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    return {r["alert"]: r for g in rules["groups"] for r in g["rules"]}


def _alert_exprs() -> dict[str, str]:
    return {name: str(r["expr"]) for name, r in _alert_rules().items()}


def _subst(expr: str) -> str:
    return (expr.replace("$__rate_interval", "4s").replace("$instance", ".*")
            .replace("$listener", ".*").replace("$backend", ".*"))


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:forwarder|process)_\w+)", expr))


def _declared(exposition: str) -> set[str]:
    """Series names the forwarder's /metrics declares (# TYPE), histograms expanded."""
    names = set()
    for kind_line in re.finditer(r"^# TYPE (\S+) (\S+)$", exposition, re.M):
        name, kind = kind_line[1], kind_line[2]
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


class Prom:
    def __init__(self, binary: str, target: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fwprom-"))
        self.port = free_port()
        cfg = self.dir / "prometheus.yml"
        cfg.write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: forwarder
    static_configs:
      - targets: ["{target}"]
""")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={cfg}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "log", "wb"))  # noqa: SIM115
        self.url = f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def _api(self, path: str, **params: str | float) -> Any:
        data = get_json(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        assert data["status"] == "success", (path, params, data)
        return data["data"]

    def query_range(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        return list(self._api("query_range", query=expr, start=start, end=end,
                              step="1s")["result"])

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        return list(self._api("query", query=expr, time=time.time() if at is None else at)
                    ["result"])

    def value(self, expr: str) -> float | None:
        """The expression's one value now, None while it has no series."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def samples(self, selector: str, since: float) -> list[tuple[float, float]]:
        """The raw samples Prometheus stored for one series since `since` (its scrapes)."""
        now = time.time()
        result = self.query(f"{selector}[{math.ceil(now - since) + 1}s]", at=now)
        assert len(result) <= 1, result
        return [(float(ts), float(v)) for s in result for ts, v in s["values"]
                if float(ts) >= since]

    def label_values(self, label: str, match: str, start: float, end: float) -> list[str]:
        return list(self._api(f"label/{label}/values", start=start, end=end,
                              **{"match[]": match}))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def _values(result: list[dict[str, Any]]) -> list[float]:
    return [float(v[1]) for series in result for v in series["values"]]


def test_real_prometheus_scrapes_a_scenario_and_every_query_evaluates() -> None:
    binary = need_tool("prometheus")
    port, admin, bport = free_port(), free_port(), free_port()
    cfg = toml_listener(port, bport, interval=0.2, rise=1, fall=1,
                        top=f'admin = "127.0.0.1:{admin}"')
    gate = 'forwarder_gate_open{listener="smtp"}'
    spliced = 'sum(forwarder_connections_total{listener="smtp", outcome="spliced"})'
    with forwarder(cfg) as fw:
        fw.wait_event("admin.listening")
        prom = Prom(binary, f"127.0.0.1:{admin}")
        try:
            wait_until(prom.ready, 30, "prometheus ready")
            wait_until(lambda: bool(prom.query(gate)), 30, "first scrape")
            t_start = time.time()
            # up, with traffic; Prometheus has seen it once a scrape shows all of it
            with SmtpBackend(bport):
                wait_port("127.0.0.1", port, "open", 10)
                for i in range(MAILS):
                    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
                        c.sendmail("a@x.example", ["b@y.example"],
                                   f"Subject: {i}\r\n\r\n" + "x" * 900 + "\r\n" * 20)
                # (wait_port's connect is spliced too: at least MAILS, not exactly)
                wait_until(lambda: (prom.value(spliced) or 0) >= MAILS, 30,
                           f"a scrape with all {MAILS} spliced connections", interval=0.1)
            # down: the gate closes; wait for three scrapes of the closed gate
            wait_port("127.0.0.1", port, "refused", 10)
            t_down = time.time()
            wait_until(lambda: [v for _, v in prom.samples(gate, t_down)].count(0.0) >= 3,
                       30, "three scrapes of the closed gate", interval=0.1)
            assert connect_result("127.0.0.1", port) == "refused"
            down = prom.samples(gate, t_down)
            first_zero = next(i for i, (_, v) in enumerate(down) if v == 0)
            assert all(v == 0 for _, v in down[first_zero:]), down  # no flapping while down
            z_start, z_end = down[first_zero][0], down[-1][0]
            # up again: wait for a scrape of the reopened gate
            with SmtpBackend(bport):
                wait_port("127.0.0.1", port, "open", 10)
                t_up = time.time()
                wait_until(lambda: 1.0 in [v for _, v in prom.samples(gate, t_up)], 30,
                           "a scrape of the reopened gate", interval=0.1)
                reopened = next(ts for ts, v in prom.samples(gate, t_up) if v == 1)
                t_end = time.time()
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics",
                                            timeout=5) as r:
                    declared = _declared(r.read().decode())

            # every query Prometheus can evaluate, and every metric it reads is exported
            targets = _dashboard_targets()
            errors, empty = [], []
            for title, expr in targets + list(_alert_exprs().items()):
                try:
                    result = prom.query_range(_subst(expr), t_start, t_end)
                except Exception as e:  # collect them all, report at once
                    errors.append(f"{title}: {expr}: {e}")
                    continue
                undeclared = _metric_names(expr) - declared
                if undeclared:
                    errors.append(f"{title}: {expr}: not in the forwarder's /metrics: "
                                  f"{sorted(undeclared)}")
                if not result and (title, expr) in targets:
                    empty.append((title, expr))
            assert not errors, errors
            # a dashboard query comes back empty only for a family with no sample here,
            # and only the event-only families may lack samples
            unsampled = {m for _, e in targets for m in _metric_names(e)
                         if not prom.query(f"count(last_over_time({m}[5m]))", at=t_end)}
            assert unsampled <= EVENT_ONLY.keys(), unsampled - EVENT_ONLY.keys()
            for title, expr in empty:
                assert _metric_names(expr) & unsampled, f"{title}: no series: {expr}"

            # the variables list what this forwarder exports
            variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
            seen = {}
            for name in ("instance", "listener", "backend"):
                m = re.fullmatch(r"label_values\((.+), (\w+)\)", variables[name]["query"])
                assert m and m[2] == name, variables[name]
                seen[name] = prom.label_values(name, _subst(m[1]), t_start, t_end)
            assert seen == {"instance": [f"127.0.0.1:{admin}"], "listener": ["smtp"],
                            "backend": [f"127.0.0.1:{bport}"]}, seen

            values = _values(prom.query_range(gate, t_start, t_end))
            assert 0.0 in values and 1.0 in values
            bytes_rate = _values(prom.query_range(
                _subst(next(e for _, e in targets if "splice_bytes" in e)),
                t_start, t_end))
            assert max(bytes_rate) > 0
            conns = _values(prom.query_range(
                'sum(rate(forwarder_connections_total{outcome="spliced"}[4s]))',
                t_start, t_end))
            assert max(conns) > 0
            # the gate-closed alert expression holds while the gate is closed, not after
            closed = _alert_exprs()["ForwarderGateClosed"]
            during = prom.query_range(closed, z_start, z_end)
            assert during and all(v == 0 for v in _values(during)), during
            assert not prom.query(closed, at=reopened)
            for name in QUIET:
                assert not prom.query_range(_alert_exprs()[name], t_start, t_end), name
        finally:
            prom.stop()
