#!/usr/bin/env python3
"""Generates dashboards/forwarder.json, the Grafana dashboard for the forwarder.

The dashboard is code so every query lives in one place: tests evaluate each expression
against a real Prometheus and check that the committed JSON matches this generator.

    python3 dashboards/generate.py          # rewrite forwarder.json
    python3 dashboards/generate.py --check  # exit 1 if forwarder.json is stale
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("forwarder.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'instance=~"$instance"'
LSEL = f'{SEL}, listener=~"$listener"'
BSEL = f'{SEL}, backend=~"$backend"'


def target(expr: str, legend: str, ref: str = "A") -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}


def panel(title: str, kind: str, targets: list[dict[str, Any]], x: int, y: int,
          w: int = 12, h: int = 8, unit: str = "short", description: str = "",
          **extra: Any) -> dict[str, Any]:
    p: dict[str, Any] = {
        "title": title, "type": kind, "datasource": DS, "description": description,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {}, "targets": [dict(t, refId=chr(65 + i)) for i, t in enumerate(targets)],
    }
    p.update(extra)
    return p


def quantile(q: float, metric: str, sel: str, by: str) -> str:
    return (f"histogram_quantile({q}, sum by (le, {by}) "
            f"(rate({metric}_bucket{{{sel}}}[$__rate_interval])))")


def panels() -> list[dict[str, Any]]:
    updown = {"mappings": [{"type": "value", "options": {
        "0": {"text": "closed", "color": "red"}, "1": {"text": "open", "color": "green"}}}]}
    backend_map = {"mappings": [{"type": "value", "options": {
        "0": {"text": "down", "color": "red"}, "1": {"text": "up", "color": "green"}}}]}
    out = [
        panel("Gate (listening?)", "state-timeline",
              [target(f"forwarder_gate_open{{{LSEL}}}", "{{instance}} {{listener}}")], 0, 0,
              description="open = the port accepts; closed = bound but refusing (senders "
                          "fail over to the next MX)",
              fieldConfig={"defaults": {"unit": "short", **updown}, "overrides": []}),
        panel("Backends up", "state-timeline",
              [target(f"forwarder_backend_up{{{BSEL}}}", "{{instance}} {{backend}}")], 12, 0,
              fieldConfig={"defaults": {"unit": "short", **backend_map}, "overrides": []}),
        panel("Gate transitions by reason", "timeseries",
              [target(f"sum by (listener, state, reason) "
                      f"(increase(forwarder_gate_transitions_total{{{LSEL}}}[$__rate_interval]))",
                      "{{listener}} {{state}} ({{reason}})")], 0, 8),
        panel("Probe latency p50 / p99", "timeseries",
              [target(quantile(0.5, "forwarder_probe_duration_seconds", BSEL, "backend"),
                      "p50 {{backend}}"),
               target(quantile(0.99, "forwarder_probe_duration_seconds", BSEL, "backend"),
                      "p99 {{backend}}")], 12, 8, unit="s"),
        panel("Probe failures /s", "timeseries",
              [target(f'sum by (backend, result) (rate(forwarder_probes_total'
                      f'{{{BSEL}, result!="success"}}[$__rate_interval]))',
                      "{{backend}} {{result}}"),
               target(f"sum by (backend, reason) (rate(forwarder_backend_passive_failures_total"
                      f"{{{BSEL}}}[$__rate_interval]))", "{{backend}} passive {{reason}}")],
              0, 16, unit="ops"),
        panel("Connections /s by outcome", "timeseries",
              [target(f"sum by (listener, outcome) (rate(forwarder_connections_total{{{LSEL}}}"
                      f"[$__rate_interval]))", "{{listener}} {{outcome}}")], 12, 16,
              unit="ops"),
        panel("Active connections", "timeseries",
              [target(f"sum by (listener) (forwarder_connections_active{{{LSEL}}})",
                      "{{listener}}")], 0, 24),
        panel("Bytes /s each way", "timeseries",
              [target(f"sum by (listener, direction) (rate(forwarder_splice_bytes_total"
                      f"{{{LSEL}}}[$__rate_interval]))", "{{listener}} {{direction}}")],
              12, 24, unit="Bps"),
        panel("Splice duration p50 / p99", "timeseries",
              [target(quantile(0.5, "forwarder_splice_duration_seconds", LSEL, "listener"),
                      "p50 {{listener}}"),
               target(quantile(0.99, "forwarder_splice_duration_seconds", LSEL, "listener"),
                      "p99 {{listener}}")], 0, 32, unit="s"),
        panel("Backend connect latency p50 / p99", "timeseries",
              [target(quantile(0.5, "forwarder_backend_connect_seconds", BSEL, "backend"),
                      "p50 {{backend}}"),
               target(quantile(0.99, "forwarder_backend_connect_seconds", BSEL, "backend"),
                      "p99 {{backend}}")], 12, 32, unit="s"),
        panel("Refusals, rate limits and 421s /s", "timeseries",
              [target(f'sum by (listener, outcome) (rate(forwarder_connections_total{{{LSEL}, '
                      f'outcome=~"refused_acl|rate_limited|no_backend_421|backend_failed_421"}}'
                      f"[$__rate_interval]))", "{{listener}} {{outcome}}"),
               target(f"sum by (errno) (rate(forwarder_accept_errors_total{{{LSEL}}}"
                      f"[$__rate_interval]))", "accept error {{errno}}")], 0, 40, unit="ops"),
        panel("DNS discovery", "timeseries",
              [target(f"sum by (listener) (forwarder_dns_peers{{{LSEL}}})", "{{listener}} peers"),
               target(f"sum by (listener, result) (rate(forwarder_dns_lookups_total{{{LSEL}}}"
                      f"[$__rate_interval]))", "{{listener}} lookups {{result}}")], 12, 40),
        panel("Process CPU", "timeseries",
              [target(f"rate(process_cpu_seconds_total{{{SEL}}}"
                      f"[$__rate_interval])", "{{instance}}")], 0, 48, w=8, unit="percentunit"),
        panel("Process memory (RSS)", "timeseries",
              [target(f"process_resident_memory_bytes{{{SEL}}}", "{{instance}}")], 8, 48, w=8,
              unit="bytes"),
        panel("Open file descriptors", "timeseries",
              [target(f"process_open_fds{{{SEL}}}", "{{instance}} open"),
               target(f"process_max_fds{{{SEL}}}", "{{instance}} max")], 16, 48, w=8),
    ]
    for i, p in enumerate(out, 1):
        p["id"] = i
    return out


def variable(name: str, query: str, label: str) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": name}, "definition": query,
            "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
            "current": {"text": "All", "value": "$__all"}, "sort": 1}


def dashboard() -> dict[str, Any]:
    return {
        "title": "forwarder",
        "uid": "forwarder-overview",
        "description": "Health-aware TCP forwarder: gate, probes, splices",
        "tags": ["forwarder", "smtp"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0},
            variable("instance", "label_values(forwarder_build_info, instance)", "Instance"),
            variable("listener", 'label_values(forwarder_gate_open{instance=~"$instance"}, '
                                 "listener)", "Listener"),
            variable("backend", 'label_values(forwarder_backend_up{instance=~"$instance"}, '
                                "backend)", "Backend"),
        ]},
        "annotations": {"list": []},
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python3 {__file__}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
