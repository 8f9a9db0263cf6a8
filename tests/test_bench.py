"""The benchmark (tests/perf/bench.py) runs end to end and reports numbers for the forwarder.

Not a performance assertion: figures on a shared machine are noisy. The smoke run checks that
every workload produces positive numbers for the forwarder row (the scale workload at 100
held sessions too); the heavy run checks the 10,000 idle-connection memory measurement
completes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import need_tool

ROOT = Path(__file__).resolve().parent.parent


def run_bench(args: list[str], out: Path, timeout: float) -> tuple[str, dict[str, Any]]:
    p = subprocess.run([sys.executable, "-m", "tests.perf.bench", *args, "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, f"bench failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-3000:]}"
    data: dict[str, Any] = json.loads(out.read_text())
    return p.stdout, data


def test_smoke(tmp_path: Path) -> None:
    need_tool("iperf3")
    need_tool("cc")
    stdout, data = run_bench(["--smoke", "--markdown"], tmp_path / "out.json", timeout=110)
    assert "forwarder" in data["rows"], data["skipped"]
    assert "smtp" not in data["skipped"], data["skipped"]  # postfix's tools: see bench.py
    fwd = data["medians"]["forwarder"]
    for key in ("bulk1", "bulk8", "smtp", "churn", "cpu_s_per_gb", "idle_rss_mb", "rr_p50"):
        assert isinstance(fwd.get(key), float) and fwd[key] > 0, (key, fwd)
    assert isinstance(fwd.get("kb_per_conn"), float), fwd
    assert isinstance(fwd.get("rr_p50_added"), float), fwd
    assert data["medians"]["direct"]["churn"] > 0
    # the markdown table: a forwarder line with a number in every column
    line = next(x for x in stdout.splitlines() if x.startswith("| forwarder |"))
    cells = [c.strip() for c in line.strip("|").split("|")][1:]
    assert len(cells) == 10 and all(c != "-" for c in cells), line
    assert float(cells[0]) > 0 and float(cells[3].replace(",", "")) > 0, line
    if "haproxy" in data["rows"]:
        assert "÷ haproxy" in stdout
    # the scale workload: 100 sessions held open through the row, churn beside them
    assert fwd["scale100_conns"] == 100, fwd
    # KB may read 0: the row can reuse memory it kept from the churn run before
    assert fwd["scale100_cpu"] > 0 and fwd["scale100_kb"] >= 0, fwd
    scale = stdout[stdout.index("Cost as concurrency grows"):]
    line = next(x for x in scale.splitlines() if x.startswith("| forwarder |"))
    cells = [c.strip() for c in line.strip("|").split("|")][1:]
    assert "| CPU µs/session at 100 | KB/conn at 100 |" in scale, scale
    assert float(cells[0]) > 0 and float(cells[1]) >= 0, line


@pytest.mark.heavy
@pytest.mark.timeout(600)
def test_idle_connections_10k(tmp_path: Path) -> None:
    need_tool("cc")
    stdout, data = run_bench(["--quick", "--rows", "forwarder", "--workloads", "mem",
                              "--idle-conns", "10000", "--markdown"],
                             tmp_path / "out.json", timeout=560)
    fwd = data["medians"]["forwarder"]
    # RLIMIT_NOFILE may cap the count (2 fds per relayed connection): at least 5,000
    assert fwd["idle_conns"] >= 5000, (fwd, data["notes"])
    assert isinstance(fwd["kb_per_conn"], float) and fwd["kb_per_conn"] > 0, fwd
    assert "KB per idle conn" in stdout
