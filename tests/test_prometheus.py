"""Metrics against a real Prometheus: promtool checks, the alert rules' unit tests, and a
live scrape of a running forwarder through a scenario, after which every dashboard query
and alert expression is evaluated by Prometheus itself."""

from __future__ import annotations

import json
import shutil
import smtplib
import subprocess
import sys
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


def get_json(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def test_dashboard_json_matches_its_generator() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "dashboards" / "generate.py"), "--check"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    d = json.loads(DASHBOARD.read_text())
    names = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "instance", "listener", "backend"} <= names
    assert all(p["datasource"]["uid"] == "${datasource}" for p in d["panels"])


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


def _dashboard_exprs() -> list[str]:
    d = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in d["panels"] for t in p["targets"]]


def _alert_exprs() -> dict[str, str]:
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    return {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}


def _subst(expr: str) -> str:
    return (expr.replace("$__rate_interval", "4s").replace("$instance", ".*")
            .replace("$listener", ".*").replace("$backend", ".*"))


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

    def query_range(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        q = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": "1s"})
        data = get_json(f"{self.url}/api/v1/query_range?{q}")
        assert data["status"] == "success", (expr, data)
        return list(data["data"]["result"])

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
    with forwarder(cfg) as fw:
        fw.wait_event("admin.listening")
        prom = Prom(binary, f"127.0.0.1:{admin}")
        try:
            wait_until(prom.ready, 30, "prometheus ready")
            wait_until(lambda: bool(prom.query_range(
                "forwarder_gate_open", time.time() - 5, time.time())), 30, "first scrape")
            t_start = time.time()
            # up, with traffic
            with SmtpBackend(bport):
                wait_port("127.0.0.1", port, "open", 10)
                for i in range(20):
                    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
                        c.sendmail("a@x.example", ["b@y.example"],
                                   f"Subject: {i}\r\n\r\n" + "x" * 900 + "\r\n" * 20)
                time.sleep(3)  # let a few scrapes see the traffic: scrapes are time-based
            # down
            wait_port("127.0.0.1", port, "refused", 10)
            t_down = time.time()
            time.sleep(4)
            t_down_end = time.time()
            assert connect_result("127.0.0.1", port) == "refused"
            # up again
            with SmtpBackend(bport):
                wait_port("127.0.0.1", port, "open", 10)
                time.sleep(3)
            t_end = time.time()

            errors = []
            for expr in _dashboard_exprs() + list(_alert_exprs().values()):
                try:
                    prom.query_range(_subst(expr), t_start, t_end)
                except Exception as e:  # collect them all, report at once
                    errors.append(f"{expr}: {e}")
            assert not errors, errors

            gate = _values(prom.query_range('forwarder_gate_open{listener="smtp"}',
                                            t_start, t_end))
            assert 0.0 in gate and 1.0 in gate
            bytes_rate = _values(prom.query_range(
                _subst(next(e for e in _dashboard_exprs() if "splice_bytes" in e)),
                t_start, t_end))
            assert max(bytes_rate) > 0
            conns = _values(prom.query_range(
                'sum(rate(forwarder_connections_total{outcome="spliced"}[4s]))',
                t_start, t_end))
            assert max(conns) > 0
            # the gate-closed alert expression holds during the down phase, not after
            closed = _alert_exprs()["ForwarderGateClosed"]
            during = prom.query_range(closed, t_down + 1.5, t_down_end - 0.5)
            assert during and all(float(v[1]) == 0 for s in during for v in s["values"])
            assert not prom.query_range(closed, t_end - 1, t_end)
        finally:
            prom.stop()
