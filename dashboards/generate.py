#!/usr/bin/env python3
"""Generates dashboards/forwarder.json, the Grafana dashboard for the forwarder.

The dashboard is code, built with Grafana's typed builders (`grafana-foundation-sdk`, the
Grafana 11.6 line, pinned in the `dev` extras), so every query lives in one place: tests
check that the committed JSON is exactly this generator's output, that it round-trips
through the SDK's models of Grafana's schema, and evaluate each expression against a real
Prometheus.

    .venv/bin/python dashboards/generate.py           # rewrite forwarder.json
    .venv/bin/python dashboards/generate.py --check   # exit 1 if forwarder.json is stale
    .venv/bin/python dashboards/generate.py --stdout  # print the JSON instead
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TypeVar

try:
    from grafana_foundation_sdk.builders import dashboard as dash
    from grafana_foundation_sdk.builders import prometheus, statetimeline, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import dashboard as model
except ModuleNotFoundError as e:  # run with the system python, outside the venv
    raise SystemExit(f"{e}: the generator needs the dev extras "
                     "(.venv/bin/pip install -e '.[dev]'), run it with .venv/bin/python") from e

OUT = Path(__file__).with_name("forwarder.json")
DS = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = 'instance=~"$instance"'
LSEL = f'{SEL}, listener=~"$listener"'
BSEL = f'{SEL}, backend=~"$backend"'

P = TypeVar("P", timeseries.Panel, statetimeline.Panel)


def target(expr: str, legend: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).datasource(DS)


def setup(p: P, title: str, targets: list[prometheus.Dataquery], *, w: int = 12, h: int = 8,
          unit: str = "short", description: str = "") -> P:
    """What every panel has: title, data source, size (the dashboard builder places panels
    left to right, wrapping at 24 columns), unit, and its queries (refIds A, B, ...)."""
    p = p.title(title).datasource(DS).span(w).height(h).unit(unit)
    if description:
        p = p.description(description)
    for i, t in enumerate(targets):
        p = p.with_target(t.ref_id(chr(ord("A") + i)))
    return p


def graph(title: str, targets: list[prometheus.Dataquery], *, w: int = 12,
          unit: str = "short", description: str = "") -> timeseries.Panel:
    return setup(timeseries.Panel(), title, targets, w=w, unit=unit, description=description)


def states(title: str, expr: str, legend: str, zero: str, one: str,
           description: str = "") -> statetimeline.Panel:
    mapping = model.ValueMap(options={
        "0": model.ValueMappingResult(text=zero, color="red"),
        "1": model.ValueMappingResult(text=one, color="green")})
    return setup(statetimeline.Panel(), title, [target(expr, legend)],
                 description=description).mappings([mapping])


def quantile(q: float, metric: str, sel: str, by: str) -> str:
    return (f"histogram_quantile({q}, sum by (le, {by}) "
            f"(rate({metric}_bucket{{{sel}}}[$__rate_interval])))")


def p50_p99(title: str, metric: str, sel: str, by: str) -> timeseries.Panel:
    return graph(title, [target(quantile(0.5, metric, sel, by), f"p50 {{{{{by}}}}}"),
                         target(quantile(0.99, metric, sel, by), f"p99 {{{{{by}}}}}")],
                 unit="s")


def panels() -> list[timeseries.Panel | statetimeline.Panel]:
    """In reading order; rows of two (12 columns each), the process row three (8 each)."""
    return [
        states("Gate (listening?)", f"forwarder_gate_open{{{LSEL}}}", "{{instance}} {{listener}}",
               "closed", "open",
               description="open = the port accepts; closed = bound but refusing (senders "
                           "fail over to the next MX)"),
        states("Backends up", f"forwarder_backend_up{{{BSEL}}}", "{{instance}} {{backend}}",
               "down", "up"),
        graph("Gate transitions by reason",
              [target(f"sum by (listener, state, reason) "
                      f"(increase(forwarder_gate_transitions_total{{{LSEL}}}[$__rate_interval]))",
                      "{{listener}} {{state}} ({{reason}})")]),
        p50_p99("Probe latency p50 / p99", "forwarder_probe_duration_seconds", BSEL, "backend"),
        graph("Probe failures /s",
              [target(f'sum by (backend, result) (rate(forwarder_probes_total'
                      f'{{{BSEL}, result!="success"}}[$__rate_interval]))',
                      "{{backend}} {{result}}"),
               target(f"sum by (backend, reason) (rate(forwarder_backend_passive_failures_total"
                      f"{{{BSEL}}}[$__rate_interval]))", "{{backend}} passive {{reason}}")],
              unit="ops"),
        graph("Connections /s by outcome",
              [target(f"sum by (listener, outcome) (rate(forwarder_connections_total{{{LSEL}}}"
                      f"[$__rate_interval]))", "{{listener}} {{outcome}}")], unit="ops"),
        graph("Active connections",
              [target(f"sum by (listener) (forwarder_connections_active{{{LSEL}}})",
                      "{{listener}}")]),
        graph("Bytes /s each way",
              [target(f"sum by (listener, direction) (rate(forwarder_splice_bytes_total"
                      f"{{{LSEL}}}[$__rate_interval]))", "{{listener}} {{direction}}")],
              unit="Bps"),
        p50_p99("Splice duration p50 / p99", "forwarder_splice_duration_seconds", LSEL,
                "listener"),
        p50_p99("Backend connect latency p50 / p99", "forwarder_backend_connect_seconds", BSEL,
                "backend"),
        graph("Refusals, rate limits and 421s /s",
              [target(f'sum by (listener, outcome) (rate(forwarder_connections_total{{{LSEL}, '
                      f'outcome=~"refused_acl|rate_limited|no_backend_421|backend_failed_421"}}'
                      f"[$__rate_interval]))", "{{listener}} {{outcome}}"),
               target(f"sum by (errno) (rate(forwarder_accept_errors_total{{{LSEL}}}"
                      f"[$__rate_interval]))", "accept error {{errno}}")], unit="ops"),
        graph("DNS discovery",
              [target(f"sum by (listener) (forwarder_dns_peers{{{LSEL}}})", "{{listener}} peers"),
               target(f"sum by (listener, result) (rate(forwarder_dns_lookups_total{{{LSEL}}}"
                      f"[$__rate_interval]))", "{{listener}} lookups {{result}}")]),
        graph("Gate open failures (listen() failed)",
              [target(f"sum by (instance, listener, errno) (increase("
                      f"forwarder_gate_open_failures_total{{{LSEL}}}[$__rate_interval]))",
                      "{{instance}} {{listener}} {{errno}}")],
              description="The gate should open but listen() failed (EADDRINUSE: another "
                          "process holds the port); retried with backoff, the port refuses "
                          "meanwhile. Alert: ForwarderGateOpenFailing"),
        graph("Internal errors (task restarted)",
              [target(f"sum by (instance, task) (increase("
                      f"forwarder_internal_errors_total{{{SEL}}}[$__rate_interval]))",
                      "{{instance}} {{task}}")],
              description="Exceptions in a supervised task or callback, logged (task.crashed, "
                          "with the traceback) and the task restarted; any is a bug to report. "
                          "Alert: ForwarderInternalErrors"),
        graph("Process CPU",
              [target(f"rate(process_cpu_seconds_total{{{SEL}}}[$__rate_interval])",
                      "{{instance}}")], w=8, unit="percentunit"),
        graph("Process memory (RSS)",
              [target(f"process_resident_memory_bytes{{{SEL}}}", "{{instance}}")], w=8,
              unit="bytes"),
        graph("Open file descriptors",
              [target(f"process_open_fds{{{SEL}}}", "{{instance}} open"),
               target(f"process_max_fds{{{SEL}}}", "{{instance}} max")], w=8),
    ]


def variable(name: str, query: str, label: str) -> dash.QueryVariable:
    """A multi-value Prometheus label variable with All (matching `.*`).  The query is the
    string form: Grafana 11.6's schema types an object query as a map of objects, which a
    Prometheus {"query": ..., "refId": ...} is not."""
    return (dash.QueryVariable(name).label(label).datasource(DS)
            .query(query)
            .include_all(True).multi(True).all_value(".*")
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(model.VariableSort.ALPHABETICAL_ASC)
            .current(model.VariableOption(text="All", value="$__all", selected=True)))


def dashboard() -> dash.Dashboard:
    d = (dash.Dashboard("forwarder").uid("forwarder-overview")
         .description("Health-aware TCP forwarder: gate, probes, splices")
         .tags(["forwarder", "smtp"]).timezone("browser").version(1).refresh("30s")
         .time("now-6h", "now")
         .with_variable(dash.DatasourceVariable("datasource").label("Data source")
                        .type("prometheus").hide(model.VariableHide.DONT_HIDE))
         .with_variable(variable("instance", "label_values(forwarder_build_info, instance)",
                                 "Instance"))
         .with_variable(variable("listener", 'label_values(forwarder_gate_open'
                                             '{instance=~"$instance"}, listener)', "Listener"))
         .with_variable(variable("backend", 'label_values(forwarder_backend_up'
                                            '{instance=~"$instance"}, backend)', "Backend")))
    for i, p in enumerate(panels(), 1):
        d = d.with_panel(p.id(i))
    return d


def render() -> str:
    return json.dumps(dashboard().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if the file differs from what would be written")
    ap.add_argument("--stdout", action="store_true", help="print the JSON, write nothing")
    ap.add_argument("--out", type=Path, default=OUT, help=f"file to write (default {OUT})")
    args = ap.parse_args(argv)
    text = render()
    if args.stdout:
        sys.stdout.write(text)
        return 0
    out: Path = args.out
    if args.check:
        if not out.exists() or out.read_text() != text:
            print(f"{out} is stale: run {Path(sys.executable).name} {__file__}",
                  file=sys.stderr)
            return 1
        return 0
    out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
