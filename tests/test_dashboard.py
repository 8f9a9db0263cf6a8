"""The Grafana dashboard: dashboards/forwarder.json is exactly what dashboards/generate.py
prints (no hand edits), the generator's --check mode catches a stale file, the JSON
survives Grafana's typed models (grafana-foundation-sdk, Grafana 11.6) without losing a key,
and it has the variables and panels operators rely on.  (Grafana's JSON Schemas are not in
the SDK's wheel nor in any registry this project installs from, so the SDK's typed models,
generated from the same schema, are the check.)  The queries themselves are evaluated by a
real Prometheus in test_prometheus.py."""

from __future__ import annotations

import copy
import difflib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import prometheus

from .helpers import ROOT

GENERATOR = ROOT / "dashboards" / "generate.py"
DASHBOARD = ROOT / "dashboards" / "forwarder.json"
BACKEND_METRICS = ("forwarder_backend_", "forwarder_probe")  # labelled {backend}, not listener


def generator(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(GENERATOR), *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def committed() -> dict[str, Any]:
    d: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return d


def test_committed_dashboard_is_exactly_the_generator_output() -> None:
    r = generator("--stdout")
    assert r.returncode == 0, r.stderr
    text = DASHBOARD.read_text()
    if r.stdout != text:
        diff = "".join(difflib.unified_diff(
            text.splitlines(keepends=True), r.stdout.splitlines(keepends=True),
            "dashboards/forwarder.json (committed)", "generate.py --stdout", n=2))
        pytest.fail("forwarder.json is not the generator's output (hand-edited, or generate.py "
                    "changed without regenerating): run .venv/bin/python dashboards/generate.py"
                    "\n" + diff[:6000])
    r = generator("--check")
    assert r.returncode == 0, r.stderr


def test_check_mode_fails_on_a_stale_file_and_regenerating_fixes_it(tmp_path: Path) -> None:
    stale = tmp_path / "forwarder.json"
    d = committed()
    d["panels"][0]["title"] += " (hand edit)"
    stale.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    r = generator("--check", "--out", str(stale))
    assert r.returncode == 1 and "stale" in r.stderr, (r.returncode, r.stderr)
    r = generator("--check", "--out", str(tmp_path / "missing.json"))
    assert r.returncode == 1, r.stderr

    assert generator("--out", str(stale)).returncode == 0
    assert stale.read_text() == DASHBOARD.read_text()
    r = generator("--check", "--out", str(stale))
    assert r.returncode == 0, r.stderr


def _through_sdk(d: dict[str, Any]) -> dict[str, Any]:
    """Decode with the SDK's models (panel and query plugins registered), encode again."""
    plugins.register_default_plugins()
    out: dict[str, Any] = json.loads(json.dumps(model.Dashboard.from_json(d), cls=JSONEncoder))
    return out


def _lost(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths of `a` that `b` lacks or holds differently (b may add keys: plugin defaults)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [p for k, v in a.items()
                for p in (_lost(v, b[k], f"{path}/{k}") if k in b else [f"{path}/{k}"])]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [p for i, (x, y) in enumerate(zip(a, b, strict=True))
                for p in _lost(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def test_dashboard_survives_the_sdk_models_of_grafanas_schema() -> None:
    """The models are generated from Grafana 11.6's schema and read only the fields it
    defines: a key they drop (a misspelling, a field Grafana does not know) is reported.
    All they may add is the panel plugins' defaults under fieldConfig.defaults.custom."""
    d = committed()
    assert _lost(d, _through_sdk(d)) == []
    plugins.register_default_plugins()
    decoded = model.Dashboard.from_json(d)
    assert decoded.panels and all(  # typed as Prometheus queries, not kept as opaque bags
        isinstance(t, prometheus.Dataquery) for p in decoded.panels
        if isinstance(p, model.Panel) for t in p.targets or [])
    # the check can fail: each of these is dropped by the models, so it shows up as lost
    for where, key in [(("panels", 0), "fieldconfig"), (("panels", 3, "targets", 0), "legend"),
                       (("templating", "list", 1), "definition"), ((), "schema_version")]:
        bad = copy.deepcopy(d)
        node: Any = bad
        for k in where:
            node = node[k]
        node[key] = "x"
        assert _lost(bad, _through_sdk(bad)), (where, key)


def _label_filters(expr: str) -> set[tuple[str, str]]:
    """(label, variable) for each `label=~"$variable"` in a query."""
    return {(m[1], m[2]) for m in re.finditer(r'(\w+)=~"\$(\w+)"', expr)}


def test_dashboard_variables_panels_and_queries() -> None:
    d = committed()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert list(variables) == ["datasource", "instance", "listener", "backend"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("instance", "listener", "backend"):
        v = variables[name]
        assert v["type"] == "query" and v["datasource"]["uid"] == "${datasource}"
        assert v["includeAll"] and v["multi"] and v["allValue"] == ".*"
        assert re.fullmatch(rf"label_values\(\w+(\{{.*\}})?, {name}\)", v["query"])

    panels = d["panels"]
    assert [p["id"] for p in panels] == list(range(1, len(panels) + 1))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        assert p["targets"], p["title"]
        assert [t["refId"] for t in p["targets"]] == [chr(65 + i) for i in range(len(p["targets"]))]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"], p["title"]
            filters = _label_filters(t["expr"])
            assert ("instance", "instance") in filters, (p["title"], t["expr"])
            for metric in re.findall(r"\b(forwarder_\w+)\{", t["expr"]):
                by = "backend" if metric.startswith(BACKEND_METRICS) else "listener"
                if metric != "forwarder_internal_errors_total":  # {task} only
                    assert (by, by) in filters, (p["title"], t["expr"])
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for metric in ("forwarder_gate_open", "forwarder_backend_up", "forwarder_connections_total",
                   "forwarder_splice_bytes_total", "forwarder_gate_open_failures_total",
                   "forwarder_internal_errors_total", "process_open_fds"):
        assert re.search(rf"\b{metric}\{{", exprs), metric

