"""The status page at GET / on the admin listener: what each gate and backend is doing and
why, for a mail admin without Grafana (issue 16).

Server-rendered HTML, readable without JavaScript: inline CSS, inline SVG, no external
asset (no CDN, no font fetched).  A small inline script reloads it every few seconds; the
Content-Security-Policy sent with it allows that one script (by its hash) and nothing
else, so even a string that slipped past the escaping could not run.  Every string that
comes from the forwarder's state is escaped (`_e`): backend details are what a backend
said on the network.

It is rendered on the admin thread from data already copied off the forwarder's loop
(`/status`, the event history) and from the connection counters the admin thread reads
itself (`Outcomes`), so it costs the loop only those copies.  It stays small: the probe
history is 20 marks per check, the event table the last `EVENTS_SHOWN` events.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import quote

from . import history, metrics

EVENTS_SHOWN = 40
REFRESH = 5  # seconds between reloads (?refresh=N, 0: never)
WINDOW = 60.0  # "last minute"
SAMPLE_EVERY = 5.0  # the admin thread's snapshots of the counters, for the last minute

Counts = dict[tuple[str, ...], float]

SCRIPT = ("(function(){var b=document.body,s=+b.dataset.refresh;if(!s)return;"
          "function go(){if(document.visibilityState==='visible'&&"
          "!document.querySelector('form:focus-within'))location.reload();"
          "else setTimeout(go,s*1000)}setTimeout(go,s*1000)})();")
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
CSP = (f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{_SCRIPT_HASH}'; "
       "img-src data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "same-origin", "Cache-Control": "no-store"}

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1150px;padding:8px 16px;
color:#222;background:#fafafa}
h1{font-size:20px;margin:4px 0}h2{font-size:17px;margin:0 0 6px}h3{font-size:14px;margin:10px 0 4px}
header p,footer{color:#666;margin:2px 0}a{color:#1857b8}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 14px;margin:12px 0}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:3px 8px 3px 0;
vertical-align:top;border-bottom:1px solid #eee}th{font-weight:600;color:#555;font-size:12px}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.o{width:auto}table.o td,table.o th{text-align:right;padding-left:10px}
table.o td:first-child,table.o th:first-child{text-align:left;padding-left:0}
.b{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:700;font-size:12px;
color:#fff}.open,.up,.ok{background:#2e7d32}.closed,.down,.fail{background:#c62828}
.draining,.pending{background:#ef6c00}.why{margin:2px 0}.warn{color:#b71c1c}
.d{color:#555;font-size:12px;word-break:break-word}
form{display:inline;margin-left:10px}
button{font:13px system-ui,sans-serif;padding:2px 10px;cursor:pointer;vertical-align:2px}
svg{vertical-align:middle}td.nw{white-space:nowrap}rect.ok{fill:#2e7d32}rect.fail{fill:#c62828}
"""


def _e(v: object) -> str:
    """Escaped for HTML text and quoted attribute values."""
    return html.escape(str(v), quote=True)


def _when(t: float | None, now: float) -> str:
    if t is None:
        return "?"
    ago = max(0.0, now - t)
    if ago < 90:
        rel = f"{ago:.0f} s ago"
    elif ago < 5400:
        rel = f"{ago / 60:.0f} min ago"
    elif ago < 172800:
        rel = f"{ago / 3600:.1f} h ago"
    else:
        rel = f"{ago / 86400:.1f} days ago"
    return f"{_clock(t, now)} ({rel})"


def _clock(t: float, now: float | None = None) -> str:
    """Local time; the date only when it is not today's."""
    lt = time.localtime(t)
    if now is not None and time.localtime(now)[:3] == lt[:3]:
        return time.strftime("%H:%M:%S", lt)
    return time.strftime("%Y-%m-%d %H:%M:%S", lt)


def _ms(seconds: object) -> str:
    return f"{float(seconds) * 1000:.1f} ms" if isinstance(seconds, int | float) else "-"


# --- the connection counters: since start and over the last minute ------------------------


def read_connections() -> Counts:
    """forwarder_connections_total by (listener, outcome), workers' counts merged in: read
    from the hot family as a scrape does (a copy made by one C call)."""
    return {k: c.value for k, c in metrics.connections.children.copy().items()}


class Outcomes:
    """A ring of snapshots of the counters, kept by the admin thread (sampled every
    SAMPLE_EVERY s and at each render), from which the last minute's deltas come."""

    def __init__(self, read: Callable[[], Counts] = read_connections,
                 window: float = WINDOW, clock: Callable[[], float] = time.monotonic) -> None:
        self.read, self.window, self.clock = read, window, clock
        self.ring: deque[tuple[float, Counts]] = deque()

    def sample(self) -> tuple[float, Counts]:
        now, counts = self.clock(), self.read()
        if not self.ring or now - self.ring[-1][0] >= 1.0:  # renders do not flood it
            self.ring.append((now, counts))
        # keep the newest snapshot at least `window` old, and everything after it
        while len(self.ring) >= 2 and self.ring[1][0] <= now - self.window:
            self.ring.popleft()
        return now, counts

    def table(self) -> tuple[Counts, Counts, float]:
        """(totals, deltas over the window, the seconds the deltas cover: less than the
        window in the first minute)."""
        now, counts = self.sample()
        t0, old = self.ring[0]
        return counts, {k: v - old.get(k, 0.0) for k, v in counts.items()}, now - t0


# --- since when -------------------------------------------------------------------------


def gate_since(events: list[dict[str, Any]], name: str, state: str) -> dict[str, Any] | None:
    """The event that put the gate of `name` in `state`, from the history: the newest of
    its gate events if it agrees with the state; the start for a gate closed since then."""
    ev: dict[str, Any]
    for ev in reversed(events):
        kind = ev.get("kind")
        if ev.get("listener") == name and kind in ("gate.open", "gate.closed",
                                                   "gate.open_failed"):
            return ev if (kind == "gate.open") == (state == "open") else None
        if kind == "forwarder.started" and state == "closed" and name in ev.get("listeners", ()):
            return ev
    return None


def _last(events: list[dict[str, Any]], kinds: Iterable[str],
          **match: Any) -> dict[str, Any] | None:
    wanted = set(kinds)
    ev: dict[str, Any]
    for ev in reversed(events):
        if ev.get("kind") in wanted and all(
                ev.get(k) == v or (isinstance(ev.get(k), list) and v in ev[k])
                for k, v in match.items()):
            return ev
    return None


# --- rendering ----------------------------------------------------------------------------


def render(status: Mapping[str, Any], events: list[dict[str, Any]],
           outcomes: tuple[Counts, Counts, float], *, now: float,
           dashboard_url: str | None = None, refresh: int = REFRESH) -> str:
    totals, recent, window = outcomes
    out = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width,initial-scale=1">',
           f"<title>forwarder {_e(status.get('version', ''))}</title><style>{CSS}</style>",
           f'</head><body data-refresh="{int(refresh)}">',
           "<header><h1>forwarder status</h1><p>",
           f"version {_e(status.get('version', '?'))} · pid {_e(status.get('pid', '?'))} · "
           f"{_e(status.get('tasks', '?'))} tasks · {_e(status.get('fds', '?'))} fds · "
           f"rendered {_e(_clock(now))} {_e(time.strftime('%Z', time.localtime(now)))}"]
    if dashboard_url and dashboard_url.startswith(("http://", "https://")):
        out.append(f' · <a href="{_e(dashboard_url)}" rel="noreferrer">Grafana dashboard</a>')
    out.append(" · <a href=\"status\">/status</a> · <a href=\"events\">/events</a> · "
               "<a href=\"metrics\">/metrics</a></p>")
    if refresh:
        out.append(f"<p>reloads every {int(refresh)} s (with JavaScript; "
                   '<a href="?refresh=0">stop</a>)</p>')
    out.append("</header>")
    for lst in status.get("listeners", []):
        out.append(_listener(lst, events, totals, recent, window, now))
    workers = status.get("workers") or []
    if workers:
        out.append(_workers(workers))
    out.append(_events(events, now))
    out.append(f"<script>{SCRIPT}</script></body></html>\n")
    return "".join(out)


def _gate(lst: Mapping[str, Any], events: list[dict[str, Any]], now: float) -> str:
    name, g = str(lst.get("name", "")), lst.get("gate", {})
    state = str(g.get("state", "?"))
    since = g.get("since")
    ev = None
    if not isinstance(since, int | float):
        ev = gate_since(events, name, state)
        since = ev.get("time") if ev else None
    why = str(g.get("reason", "?"))
    if since:
        when = _when(since, now)
    elif len(events) >= history.SIZE:  # what put it there is no longer kept
        when = f"before {_clock(events[0]['time'], now)}"
    else:
        when = "unknown"
    line = [f'<p class="why" data-gate="{_e(state)}">gate <span class="b {_e(state)}">'
            f"{_e(state.upper())}</span> since {_e(when)}"
            f" · reason <b>{_e(why)}</b>"]
    if ev is not None and ev.get("kind") == "gate.open_failed" and ev.get("reason"):
        line.append(f" ({_e(ev['reason'])})")
    line.append(f" · policy {_e(g.get('policy', '?'))}</p>")
    if g.get("drained"):
        d = _last(events, ("drain",), listeners=name)
        line.append(f'<p class="why warn">drained by the operator'
                    f"{' at ' + _e(_when(d['time'], now)) if d else ''}: closed until resumed"
                    "</p>")
    if g.get("holds"):
        line.append(f'<p class="why warn">held closed: {_e(", ".join(map(str, g["holds"])))}'
                    "</p>")
    err = g.get("open_error")
    if err:
        held = f" (held by {_e(err['holder'])})" if err.get("holder") else ""
        line.append(f'<p class="why warn">listen() on {_e(err.get("address", "?"))} failed: '
                    f"{_e(err.get('error', '?'))}{held}; {_e(err.get('failures', '?'))} "
                    f"attempts, retrying in {_e(err.get('retry_in', '?'))} s</p>")
    return "".join(line)


def _buttons(name: str, drained: bool) -> str:
    q = html.escape(_query(name), quote=True)
    action = ("resume", "Resume (give the gate back to the probes)") if drained else \
        ("drain", "Drain (close the gate for maintenance)")
    return (f'<form method="post" action="{action[0]}?listener={q}">'
            f'<button type="submit">{_e(action[1])}</button>'
            "</form>")


def _query(s: str) -> str:
    return quote(s, safe="")


def _listener(lst: Mapping[str, Any], events: list[dict[str, Any]], totals: Counts,
              recent: Counts, window: float, now: float) -> str:
    name = str(lst.get("name", ""))
    g = lst.get("gate", {})
    out = [f'<section class="listener" id="listener-{_e(name)}" '
           f'data-listener="{_e(name)}" data-gate="{_e(g.get("state", "?"))}">',
           f"<h2>{_e(name)} <small class=\"d\">{_e(' '.join(lst.get('addresses', [])))} · "
           f"{_e(lst.get('mode', '?'))}</small>{_buttons(name, bool(g.get('drained')))}</h2>",
           _gate(lst, events, now),
           f"<p>live connections <b>{_e(lst.get('connections_active', 0))}</b>, waiting for a "
           f"backend {_e(lst.get('connections_pending', 0))} · greeting timeout "
           f"{_e(lst.get('greeting_timeout', '?'))} (max {_e(lst.get('greeting_timeout_max', '?'))}"
           " s)</p>",
           _outcomes(name, totals, recent, window),
           "<h3>backends</h3><table><tr><th>state</th><th>backend</th><th>greeting deadline"
           "</th><th>check</th><th>last result</th><th>latency</th><th>last probes</th></tr>"]
    for b in lst.get("backends", []):
        out.append(_backend(b, events, now))
    out.append("</table></section>")
    return "".join(out)


def _outcomes(name: str, totals: Counts, recent: Counts, window: float) -> str:
    """forwarder_connections_total of this listener: one column an outcome."""
    mine = {k[1]: (v, recent.get(k, 0.0)) for k, v in totals.items()
            if len(k) == 2 and k[0] == name}
    if not mine:
        return ""
    order = [o for o in metrics.OUTCOMES if o in mine] + sorted(set(mine) - set(metrics.OUTCOMES))
    span = "last minute" if window >= WINDOW - 1 else f"last {window:.0f} s"
    head = "".join(f"<th>{_e(o)}</th>" for o in order)
    total = "".join(f'<td data-outcome="{_e(o)}">{mine[o][0]:.0f}</td>' for o in order)
    last = "".join(f'<td data-outcome="{_e(o)}">{mine[o][1]:.0f}</td>' for o in order)
    return ('<h3>connections by outcome</h3><table class="o"><tr><th></th>'
            f'{head}</tr><tr class="total"><td>since start</td>{total}</tr>'
            f'<tr class="recent"><td>{_e(span)}</td>{last}</tr></table>')


def _state(b: Mapping[str, Any]) -> str:
    if not b.get("history"):
        return "pending"
    if not b.get("up"):
        return "down"
    return "draining" if b.get("draining") else "up"


def _backend(b: Mapping[str, Any], events: list[dict[str, Any]], now: float) -> str:
    state = _state(b)
    name = str(b.get("name", ""))
    since = ""
    ev = _last(events, ("backend.up", "backend.down"), backend=name)
    if ev and ev["kind"] == f"backend.{'up' if b.get('up') else 'down'}":
        since = f'<div class="d">since {_e(_when(ev["time"], now))}</div>'
    elif not b.get("up") and (ev := _last(events, ("probe.failed",), backend=name)):
        since = f'<div class="d">failing since {_e(_when(ev["time"], now))}</div>'  # never up
    role = ("local" if b.get("local")
            else f"{b.get('source', '?')}, priority {b.get('priority', '?')}")
    live = b.get("connections_active")
    gd = b.get("greeting_deadline") or {}
    sec = gd.get("seconds")
    secs = f"{sec:.3g}" if isinstance(sec, int | float) else "?"
    deadline = (f"{_e(secs)} s <span class=\"d\">({_e(gd.get('mode', '?'))}, "
                f"{_e(gd.get('samples', 0))} samples)</span>" if gd else "-")
    checks = b.get("checks") or [{"name": (b.get("probe") or {}).get("kind", "probe"),
                                  "history": b.get("history", [])}]
    rows = []
    for i, c in enumerate(checks):
        hist = c.get("history") or []
        last = hist[0] if hist else None
        if last is None:
            result = "<span class=\"d\">no probe yet</span>"
        else:
            cls = "ok" if last.get("ok") else "fail"
            result = (f'<span class="b {cls}">{_e(last.get("result", "?"))}</span> '
                      f'<span class="d">{_e(last.get("detail", ""))}</span>')
        head = ""
        if i == 0:
            span = f' rowspan="{len(checks)}"' if len(checks) > 1 else ""
            head = (f'<td{span} class="nw"><span class="b {state}">{state.upper()}</span>'
                    f"{since}</td>"
                    f"<td{span}><b>{_e(name)}</b><div class=\"d\">{_e(role)}"
                    f"{' · ' + _e(live) + ' live' if live is not None else ''}</div></td>"
                    f"<td{span}>{deadline}</td>")
        rows.append(f"<tr>{head}<td>{_e(c.get('name', '?'))}</td><td>{result}</td>"
                    f"<td class=\"n\">{_ms(last.get('duration')) if last else '-'}</td>"
                    f"<td class=\"nw\">{_spark(hist, now)}</td></tr>")
    return (f'<tbody class="backend" data-backend="{_e(name)}" data-state="{state}">'
            f"{''.join(rows)}</tbody>")


def _spark(hist: list[dict[str, Any]], now: float) -> str:
    """The last probes, oldest left: a bar each, its height the latency (log scale, 0.1 ms
    to 10 s), red when it failed; each bar's title says when, what and how long."""
    if not hist:
        return ""
    w, h, n = 6, 18, len(hist)
    bars = []
    for i, r in enumerate(reversed(hist)):
        ok = bool(r.get("ok"))
        d = max(float(r.get("duration") or 0.0), 1e-4)
        frac = 1.0 if not ok else min(1.0, max(0.15, (math.log10(d) + 4) / 5))
        bh = round(h * frac, 1)
        tip = (f"{_clock(float(r['at']), now) if r.get('at') else '?'} {r.get('result', '?')} "
               f"{_ms(r.get('duration'))} {r.get('detail', '')}")
        bars.append(f'<rect class="{"ok" if ok else "fail"}" x="{i * w}" y="{h - bh}" '
                    f'width="{w - 1}" height="{bh}"><title>{_e(tip)}</title></rect>')
    good = sum(1 for r in hist if r.get("ok"))
    return (f'<svg class="spark" width="{n * w}" height="{h}" viewBox="0 0 {n * w} {h}" '
            f'role="img" aria-label="{good} of {n} ok">{"".join(bars)}</svg> '
            f'<span class="d">{good}/{n} ok</span>')


def _workers(workers: list[dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td>{_e(w.get('index', '?'))}</td><td>{_e(w.get('pid', '?'))}</td>"
        f"<td>{'alive' if w.get('alive') else '<b class=warn>dead</b>'}</td>"
        f"<td class=\"n\">{_e(w.get('restarts', 0))}</td>"
        f"<td class=\"n\">{_e(w.get('connections_active', 0))}</td></tr>" for w in workers)
    return ("<section><h2>workers</h2><table style=\"width:auto\"><tr><th>#</th><th>pid</th>"
            f"<th>state</th><th>restarts</th><th>live connections</th></tr>{rows}</table>"
            "</section>")


SUBJECT = ("listener", "backend", "listeners")
SHOWN = {"seq", "time", "kind", "reason", *SUBJECT}


def subject(ev: Mapping[str, Any]) -> str:
    """What an event is about: its listener, its backend, or the listeners it names."""
    for k in SUBJECT:
        v = ev.get(k)
        if v:
            return ",".join(map(str, v)) if isinstance(v, list) else str(v)
    return ""


def details(ev: Mapping[str, Any]) -> str:
    """Its other fields, as k=v."""
    return " ".join(f"{k}={v}" for k, v in ev.items() if k not in SHOWN and v is not None)


def _events(events: list[dict[str, Any]], now: float) -> str:
    shown = events[-EVENTS_SHOWN:][::-1]
    rows = "".join(
        f'<tr data-kind="{_e(ev.get("kind", ""))}"><td>{_e(_when(ev.get("time"), now))}</td>'
        f"<td>{_e(ev.get('kind', ''))}</td><td>{_e(subject(ev))}</td>"
        f"<td>{_e(ev.get('reason') or '')}<div class=\"d\">{_e(details(ev))}</div></td></tr>"
        for ev in shown)
    more = (f" (the last {EVENTS_SHOWN} of {len(events)}: all in <a href=\"events\">/events</a>)"
            if len(events) > EVENTS_SHOWN else "")
    return (f'<section id="events"><h2>recent events{more}</h2><table><tr><th>time</th>'
            f"<th>event</th><th>listener / backend</th><th>why</th></tr>"
            f"{rows or '<tr><td colspan=4>none yet</td></tr>'}</table></section>")
