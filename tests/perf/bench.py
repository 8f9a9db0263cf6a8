"""Forwarders side by side on loopback, in one run: the project's own benchmark.

    python -m tests.perf.bench [--quick | --smoke] [--rows forwarder,haproxy,...]
                               [--workloads bulk,rr,churn,mem,scale] [--idle-conns N]
                               [--json OUT] [--markdown]

Rows: `direct` (no forwarder), `forwarder` (splice relay, tcp probe, gate, admin/metrics,
log level info, tcp mode like haproxy's), `forwarder-base` (the same with the executable
given by --baseline, e.g. a worktree of main before a change: an A/B in one run),
`forwarder-workers` (the same as `forwarder` with `--workers auto`: one worker process per CPU),
`forwarder-smtp` (smtp mode and smtp probe, as on port 25: greeting read before the splice,
421 when no backend; no bulk column, iperf3 sends no greeting), `haproxy` (tcp mode, defaults),
`haproxy-tuned` (tune.bufsize 262144, splice-auto), `socat` (fork per connection), `xinetd`
(redirect), `systemd-socket-proxyd` (socket-activated). A row whose tool is missing is skipped
with the reason printed.

Workloads, interleaved (for each workload, every row in turn, `reps` times; medians reported):
- bulk: iperf3 through the row to an iperf3 server, 1 and 8 streams (Gbit/s), and the row's
  CPU seconds per GB moved (utime+stime of its process tree, reaped children included via
  cutime/cstime: best effort for the forking rows);
- rr: round trips of 64-byte lines over one connection, with client, row and backend pinned
  to CPU 0 (p50/p99, µs added over a `direct` run made just before, paired because the
  machine drifts; unpinned, cross-CPU wake-ups made the same row swing 5x between runs);
- churn: sessions/s of 20 concurrent clients (connect, 220, QUIT, 221, close), and the row's
  CPU µs per session (utime+stime of its process tree over the run, divided by sessions);
- smtp: messages/s from Postfix's smtp-source (20 sessions, 2 kB messages) through the row
  to Postfix's smtp-sink; both taken from Debian's postfix package with `apt-get download`
  and `dpkg -x` into tests/perf/.build/postfix (postfix itself would conflict with sendmail);
- mem: VmRSS of the idle row, then KB per idle connection (PSS of the process tree) with N
  connections open through it (fork-per-connection rows get fewer, see `fork_idle_conns`);
- scale: how cost grows with concurrency, for the rows that can hold thousands of
  connections (forwarder, forwarder-workers, haproxy): with N sessions held open through the
  row (each greeted, so fully relayed: 100, 1,000, 9,500 in a full run), the KB of tree PSS
  added per held session, then churn run beside them and the row's CPU µs per churn session:
  what one more session costs a row that is already carrying N.

The clients and the SMTP-ish backend are tests/perf/load.c, compiled on first use into
tests/perf/.build/ (a Python client would be the bottleneck). Progress goes to stderr, the
tables to stdout. Quote ratios from one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import debs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BUILD = HERE / ".build"
HOST = "127.0.0.1"
PROXYD = "/lib/systemd/systemd-socket-proxyd"
ALL_ROWS = ("direct", "forwarder", "forwarder-workers", "forwarder-base", "forwarder-smtp",
            "haproxy",
            "haproxy-tuned", "socat", "xinetd", "systemd-socket-proxyd")
NO_BULK = frozenset({"forwarder-smtp"})  # iperf3 sends no greeting for smtp mode to pass on
FORKING = frozenset({"socat", "xinetd"})
WORKLOADS = ("bulk", "smtp", "rr", "churn", "mem", "scale")
SCALE_ROWS = frozenset({"forwarder", "forwarder-workers", "forwarder-base", "haproxy",
                        "haproxy-tuned"})
SMTP_SESSIONS, SMTP_LEN = 20, 2000
CHURN_CLIENTS = 20
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Mode:
    name: str
    reps: int
    bulk_secs: int          # iperf3 -t takes whole seconds
    churn_secs: float
    rr_count: int
    idle_conns: int
    fork_idle_conns: int    # socat/xinetd fork a process per connection: fewer for them
    smtp_msgs: int
    scale_points: tuple[int, ...]   # concurrent sessions held open for the scale workload


MODES = {
    "smoke": Mode("smoke", 1, 1, 0.5, 2000, 200, 50, 200, (100,)),
    "quick": Mode("quick", 1, 1, 2.0, 20000, 1000, 200, 1000, (100, 1000)),
    "full": Mode("full", 3, 3, 5.0, 20000, 10000, 500, 3000, (100, 1000, 9500)),
}

# metric key, column title, decimals
COLUMNS = (
    ("bulk1", "bulk 1 stream Gbit/s", 2),
    ("bulk8", "bulk 8 streams Gbit/s", 2),
    ("smtp", "SMTP msgs/s", 0),
    ("churn", "churn sessions/s", 0),
    ("cpu_us_per_session", "CPU µs/session", 0),
    ("rr_p50_added", "rr p50 added µs", 1),
    ("rr_p99_added", "rr p99 added µs", 1),
    ("cpu_s_per_gb", "CPU s/GB", 2),
    ("idle_rss_mb", "idle RSS MB", 1),
    ("kb_per_conn", "KB per idle conn", 1),
)
HIGHER_IS_BETTER = frozenset({"bulk1", "bulk8", "smtp", "churn"})


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ processes and ports

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        if port_open(port):
            return True
        time.sleep(0.1)
    return False


def spawn(cmd: list[str], logfile: Path,
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with logfile.open("ab") as out:
        # own session: stop() signals the group, which takes forked children (socat, xinetd)
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, env=env,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM the process (and its process group), SIGKILL after 5 s."""
    if proc is None:
        return
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    # forked children left in the group after the leader exited
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def raise_nofile(want: int = 131072) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want and os.geteuid() == 0:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (OSError, ValueError):
            pass
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return max(soft, target)


def build_load() -> Path:
    src, exe = HERE / "load.c", BUILD / "load"
    if exe.exists() and exe.stat().st_mtime >= src.stat().st_mtime:
        return exe
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("bench: a C compiler (cc) is needed to build tests/perf/load.c")
    BUILD.mkdir(exist_ok=True)
    tmp = BUILD / f"load.{os.getpid()}"
    subprocess.run([cc, "-O2", "-Wall", "-o", str(tmp), str(src)], check=True, timeout=60)
    tmp.replace(exe)
    return exe


PF_ROOT = BUILD / "postfix"
PF_TOOLS = ("usr/sbin/smtp-source", "usr/sbin/smtp-sink")
PF_LIBS = ("usr/lib/postfix",)


def postfix_tools() -> tuple[Path, Path, dict[str, str]] | str:
    """(smtp-source, smtp-sink, env) extracted from Debian's postfix package, or why not."""
    got = debs.private_root(["postfix"], BUILD / "debs", PF_ROOT, PF_TOOLS, PF_LIBS)
    if isinstance(got, str):
        return got
    return got / PF_TOOLS[0], got / PF_TOOLS[1], debs.library_path(got, PF_LIBS)


def smtp_rate(source: Path, env: dict[str, str], port: int, msgs: int) -> float | None:
    """Messages/s for `msgs` 2 kB messages over 20 concurrent sessions via the row."""
    cmd = [str(source), "-s", str(SMTP_SESSIONS), "-m", str(msgs), "-l", str(SMTP_LEN),
           "-f", "bench@example.org", "-t", "sink@example.org", "-M", "bench.example.org",
           f"{HOST}:{port}"]
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    except subprocess.TimeoutExpired:
        log(f"smtp-source via :{port} timed out")
        return None
    took = time.monotonic() - t0
    if r.returncode != 0:
        log(f"smtp-source via :{port} failed: {r.stderr.strip()[-200:]}")
        return None
    return msgs / took


# ------------------------------------------------------------------ /proc accounting

def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rfind(")") + 2:].split()  # fields from 3 (state) on


def proc_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(d))[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < 100_000:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def pin_tree(pid: int, cpus: set[int]) -> None:
    """sched_setaffinity on every thread of pid's process tree (children forked later
    inherit it)."""
    for p in proc_tree(pid):
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{p}/task")]
        except OSError:
            continue
        for t in tids:
            try:
                os.sched_setaffinity(t, cpus)
            except OSError:
                pass


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime+cutime+cstime over the process tree (reaped children included)."""
    ticks = 0
    for p in proc_tree(pid):
        try:
            f = _stat_fields(p)
            ticks += sum(int(x) for x in f[11:15])
        except (OSError, IndexError, ValueError):
            continue
    return ticks / CLK_TCK


def _kb_field(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def vmrss_kb(pid: int) -> int:
    return _kb_field(f"/proc/{pid}/status", "VmRSS:")


def tree_pss_kb(pid: int) -> int:
    total = 0
    for p in proc_tree(pid):
        pss = _kb_field(f"/proc/{p}/smaps_rollup", "Pss:")
        total += pss or vmrss_kb(p)
    return total


# ------------------------------------------------------------------ rows

@dataclass
class Row:
    name: str
    port: int
    proc: subprocess.Popen[bytes] | None = None


BASELINE: list[str] = []  # --baseline: the forwarder executable of the forwarder-base row


def forwarder_exe(name: str = "forwarder") -> str | None:
    if name == "forwarder-base":
        return BASELINE[0] if BASELINE else None
    cand = Path(sys.executable).parent / "forwarder"
    if cand.exists():
        return str(cand)
    venv = ROOT / ".venv" / "bin" / "forwarder"
    return str(venv) if venv.exists() else shutil.which("forwarder")


def sbin(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def missing_reason(name: str) -> str | None:
    needs: dict[str, list[str]] = {
        "forwarder": ["forwarder"], "forwarder-base": ["forwarder-base"],
        "forwarder-workers": ["forwarder"],
        "forwarder-smtp": ["forwarder"],
        "haproxy": ["haproxy"], "haproxy-tuned": ["haproxy"], "socat": ["socat"],
        "xinetd": ["xinetd"], "systemd-socket-proxyd": ["systemd-socket-activate", PROXYD],
    }
    for tool in needs.get(name, []):
        found = (forwarder_exe(tool) if tool.startswith("forwarder")
                 else tool if tool.startswith("/") and os.access(tool, os.X_OK)
                 else sbin(tool))
        if not found:
            return f"{tool} not installed"
    return None


def haproxy_maxconn() -> int:
    """haproxy wants 2 fds per connection plus a pipe (2 fds) per 4 connections for splicing,
    and refuses to start when RLIMIT_NOFILE (which it cannot always raise) is too low."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 30000 if soft == resource.RLIM_INFINITY else max(100, (soft - 1000) * 2 // 5)


def haproxy_cfg(listen: int, backend: int, tuned: bool) -> str:
    maxconn = haproxy_maxconn()
    glob = "    tune.bufsize 262144\n" if tuned else ""
    opts = "    option splice-auto\n" if tuned else ""
    return (f"global\n    maxconn {maxconn}\n{glob}"
            "defaults\n    mode tcp\n    timeout connect 5s\n"
            "    timeout client 1h\n    timeout server 1h\n"
            f"listen bench\n    bind {HOST}:{listen}\n{opts}"
            f"    server b {HOST}:{backend}\n")


def xinetd_cfg(listen: int, backend: int, logfile: Path) -> str:
    user = "    user = root\n" if os.geteuid() == 0 else ""
    return ("defaults\n{\n    instances = UNLIMITED\n    per_source = UNLIMITED\n"
            f"    cps = 1000000 1\n    log_type = FILE {logfile}\n}}\n"
            "service bench\n{\n    type = UNLISTED\n    socket_type = stream\n"
            f"    protocol = tcp\n    wait = no\n{user}    bind = {HOST}\n"
            f"    port = {listen}\n    redirect = {HOST} {backend}\n"
            "    instances = UNLIMITED\n    per_source = UNLIMITED\n"
            "    cps = 1000000 1\n    flags = REUSE\n}\n")


def start_row(name: str, backend: int, tmp: Path) -> Row:
    """Start a row listening on a fresh port and wait (bounded) until it accepts."""
    if name == "direct":
        return Row(name, backend)
    port = free_port()
    d = tmp / name
    d.mkdir(exist_ok=True)
    be = f"{HOST}:{backend}"
    cmd: list[str]
    if name.startswith("forwarder"):
        kind = "smtp" if name == "forwarder-smtp" else "tcp"  # mode follows the probe kind
        exe = forwarder_exe("forwarder-base" if name == "forwarder-base" else "forwarder")
        cmd = [str(exe), "--listen", f"{HOST}:{port}", "--backend", be,
               "--probe", kind, "--mode", kind,
               *(["--workers", "auto"] if name == "forwarder-workers" else []),
               "--admin", f"{HOST}:{free_port()}", "--log-level", "info"]
    elif name.startswith("haproxy"):
        cfg = d / "haproxy.cfg"
        cfg.write_text(haproxy_cfg(port, backend, tuned=name == "haproxy-tuned"))
        cmd = [str(sbin("haproxy")), "-db", "-f", str(cfg)]
    elif name == "socat":
        cmd = [str(sbin("socat")), f"TCP-LISTEN:{port},fork,reuseaddr,bind={HOST}",
               f"TCP:{be}"]
    elif name == "xinetd":
        cfg = d / "xinetd.conf"
        cfg.write_text(xinetd_cfg(port, backend, d / "xinetd-service.log"))
        cmd = [str(sbin("xinetd")), "-dontfork", "-f", str(cfg), "-pidfile",
               str(d / "xinetd.pid")]
    elif name == "systemd-socket-proxyd":
        cmd = [str(sbin("systemd-socket-activate")), "-l", f"{HOST}:{port}", PROXYD,
               "--connections-max=30000", be]
    else:
        raise ValueError(f"unknown row {name}")
    proc = spawn(cmd, d / "output.log")
    if not wait_port(port, proc):
        stop(proc)
        tail = (d / "output.log").read_text(errors="replace")[-400:]
        raise RuntimeError(f"{name} did not listen on {port} within 20 s: {tail.strip()}")
    return Row(name, port, proc)


@contextmanager
def rows_running(names: list[str], backend: int, tmp: Path,
                 skipped: dict[str, str]) -> Iterator[list[Row]]:
    rows: list[Row] = []
    try:
        for n in names:
            try:
                rows.append(start_row(n, backend, tmp))
            except (RuntimeError, OSError) as e:
                skipped[n] = str(e)
                log(f"skipping {n}: {e}")
        yield rows
    finally:
        for r in rows:
            stop(r.proc)


# ------------------------------------------------------------------ workloads

@dataclass
class Backends:
    tmp: Path
    load: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    kind: str = ""

    def start(self, kind: str, sink: tuple[Path, dict[str, str]] | None = None) -> None:
        self.stop()
        self.kind, self.port = kind, free_port()
        env = None
        if kind == "iperf3":
            cmd = [str(sbin("iperf3")), "-s", "-p", str(self.port), "-B", HOST]
        elif kind == "smtp-sink" and sink is not None:
            user = ["-u", "nobody"] if os.geteuid() == 0 else []  # it refuses to run as root
            cmd = [str(sink[0]), *user, f"{HOST}:{self.port}", "1024"]
            env = sink[1]
        else:
            cmd = [str(self.load), "server", str(self.port)]
        self.proc = spawn(cmd, self.tmp / f"backend-{kind}.log", env)
        if not wait_port(self.port, self.proc, 10.0):
            raise RuntimeError(f"backend {kind} did not start")

    def ensure(self) -> None:
        """Restart the iperf3 server on the same port if it died (it is left in place)."""
        if self.proc is not None and self.proc.poll() is None:
            return
        cmd = [str(sbin("iperf3")), "-s", "-p", str(self.port), "-B", HOST]
        self.proc = spawn(cmd, self.tmp / "backend-iperf3.log")
        wait_port(self.port, self.proc, 10.0)

    def stop(self) -> None:
        stop(self.proc)
        self.proc = None


def iperf(port: int, streams: int, secs: int, be: Backends) -> tuple[float, float] | None:
    """(Gbit/s, bytes) received by the iperf3 server, or None. One retry after a restart."""
    for attempt in range(2):
        be.ensure()
        try:
            p = subprocess.run([str(sbin("iperf3")), "-c", HOST, "-p", str(port), "-t",
                                str(secs), "-P", str(streams), "-J"],
                               capture_output=True, timeout=secs + 20)
            data: dict[str, Any] = json.loads(p.stdout or b"{}")
        except (subprocess.TimeoutExpired, json.JSONDecodeError) as e:
            data = {"error": str(e)}
        summ = data.get("end", {}).get("sum_received")
        if summ and "error" not in data:
            return float(summ["bits_per_second"]) / 1e9, float(summ["bytes"])
        log(f"iperf3 via :{port} failed (attempt {attempt + 1}): {data.get('error')}")
        be.stop()
        time.sleep(0.5)
    return None


def run_load(load: Path, args: list[str], timeout: float,
             cpus: set[int] | None = None) -> dict[str, float] | None:
    """Run a load.c client (on `cpus` if given); parse its `key value ...` output line."""
    def pin() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
    try:
        p = subprocess.run([str(load), *args], capture_output=True, text=True, timeout=timeout,
                           preexec_fn=pin)
    except subprocess.TimeoutExpired:
        log(f"load {args[0]} timed out")
        return None
    words = p.stdout.split()
    if p.returncode != 0 or len(words) % 2:
        log(f"load {' '.join(args)} failed: {p.stderr.strip()[-300:]}")
        return None
    return {k: float(v) for k, v in zip(words[::2], words[1::2], strict=True)}


@contextmanager
def held(row: Row, n: int, deadline_s: float = 180.0) -> Iterator[tuple[int, float] | None]:
    """Hold n connections open through the row, each answered by the backend's greeting,
    for the body of the with-block; it gets (connections, KB of tree PSS added per
    connection), or None when they could not all be opened."""
    assert row.proc is not None
    pid = row.proc.pid
    base = tree_pss_kb(pid)
    socks: list[socket.socket] = []
    deadline = time.monotonic() + deadline_s
    out: tuple[int, float] | None = None
    try:
        while len(socks) < n and time.monotonic() < deadline:
            batch: list[socket.socket] = []
            for _ in range(min(200, n - len(socks))):
                s = socket.create_connection((HOST, row.port), timeout=10)
                batch.append(s)
                socks.append(s)
            for s in batch:  # the greeting proves the whole path is set up
                s.settimeout(10)
                if not s.recv(64).startswith(b"220"):
                    raise RuntimeError("no greeting")
        time.sleep(1.0)
        out = len(socks), (tree_pss_kb(pid) - base) / max(1, len(socks))
    except (OSError, RuntimeError) as e:
        log(f"{row.name}: holding connections failed after {len(socks)}: {e}")
    try:
        yield out
    finally:
        for s in socks:
            s.close()
        time.sleep(min(3.0, 0.5 + len(socks) / 5000))  # let the row tear them down


def idle_conns(row: Row, n: int) -> tuple[int, float] | None:
    """(connections, KB of tree PSS added per connection) with n held open."""
    with held(row, n) as out:
        return out


def churn_once(load: Path, r: Row, secs: float) -> tuple[float, float | None] | None:
    """(sessions/s, the row's CPU µs per session) of CHURN_CLIENTS concurrent clients."""
    cpu0 = tree_cpu_seconds(r.proc.pid) if r.proc else 0.0
    out = run_load(load, ["churn", HOST, str(r.port), str(CHURN_CLIENTS), str(secs)],
                   timeout=secs + 30)
    if not out:
        return None
    if out["errors"]:
        log(f"{r.name}: churn errors {out['errors']:.0f}")
    cpu = None
    if r.proc is not None and out.get("sessions"):
        cpu = (tree_cpu_seconds(r.proc.pid) - cpu0) * 1e6 / out["sessions"]
    return out["rate"], cpu


# ------------------------------------------------------------------ the run

@dataclass
class Results:
    mode: str
    rows: list[str]
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, row: str, key: str, value: float) -> None:
        self.samples.setdefault(row, {}).setdefault(key, []).append(value)

    def median(self, row: str, key: str) -> float | None:
        vals = self.samples.get(row, {}).get(key)
        return statistics.median(vals) if vals else None

    def seen(self, names: list[str], rows: list[Row]) -> None:
        """Rows that ran in some workload, in the order asked for (not every row runs
        every workload)."""
        have = set(self.rows) | {r.name for r in rows}
        self.rows = [n for n in names if n in have]


def interleave(rows: list[Row], reps: int, what: str, fn: Callable[[Row], None]) -> None:
    for rep in range(reps):
        for r in rows:
            log(f"{what} rep {rep + 1}/{reps}: {r.name}")
            fn(r)
            time.sleep(0.2)


def run(names: list[str], mode: Mode, workloads: list[str], idle_n: int | None) -> Results:
    res = Results(mode.name, [])
    for n in names:
        reason = missing_reason(n)
        if reason:
            res.skipped[n] = reason
            log(f"skipping {n}: {reason}")
    names = [n for n in names if n not in res.skipped]
    if "bulk" in workloads and not sbin("iperf3"):
        res.skipped["bulk"] = "iperf3 not installed"
        log("skipping bulk: iperf3 not installed")
        workloads = [w for w in workloads if w != "bulk"]
    load = build_load()
    nofile = raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="fwd-bench-"))
    be = Backends(tmp, load)
    try:
        if "bulk" in workloads:
            be.start("iperf3")
            with rows_running([n for n in names if n not in NO_BULK], be.port, tmp,
                              res.skipped) as rows:
                res.seen(names, rows)
                for streams in (1, 8):
                    def bulk(r: Row, streams: int = streams) -> None:
                        cpu0 = tree_cpu_seconds(r.proc.pid) if r.proc else 0.0
                        out = iperf(r.port, streams, mode.bulk_secs, be)
                        if out is None:
                            return
                        res.add(r.name, f"bulk{streams}", out[0])
                        if r.proc is not None and out[1] > 0:
                            cpu = tree_cpu_seconds(r.proc.pid) - cpu0
                            res.add(r.name, "cpu_s_per_gb", cpu / (out[1] / 1e9))
                    interleave(rows, mode.reps, f"bulk {streams} stream(s)", bulk)
            be.stop()
        if "smtp" in workloads:
            tools = postfix_tools()
            if isinstance(tools, str):
                res.skipped["smtp"] = tools
                log(f"skipping smtp: {tools}")
            else:
                source, sink, env = tools
                be.start("smtp-sink", (sink, env))
                with rows_running([n for n in names if n not in res.skipped], be.port, tmp,
                                  res.skipped) as rows:
                    res.seen(names, rows)

                    def smtp(r: Row) -> None:
                        rate = smtp_rate(source, env, r.port, mode.smtp_msgs)
                        if rate is not None:
                            res.add(r.name, "smtp", rate)
                    interleave(rows, mode.reps, "smtp", smtp)
                be.stop()
        rest = [w for w in workloads if w not in ("bulk", "smtp")]
        cap = max(1, (nofile - 500) // 2)  # a proxy holds 2 fds per connection
        hcap = min(cap, haproxy_maxconn() - 100)

        def row_cap(r: Row) -> int:
            return hcap if r.name.startswith("haproxy") else cap
        if rest:
            be.start("load")
            with rows_running([n for n in names if n not in res.skipped], be.port, tmp,
                              res.skipped) as rows:
                res.seen(names, rows)
                time.sleep(0.5)
                for r in rows:
                    if r.proc is not None:
                        res.add(r.name, "idle_rss_mb", vmrss_kb(r.proc.pid) / 1024)
                if "rr" in rest:
                    direct = next((r for r in rows if r.name == "direct"), None)

                    every_cpu = os.sched_getaffinity(0)

                    def rr_once(r: Row) -> dict[str, float] | None:
                        # client, row and backend all on CPU 0: unpinned, the round trip
                        # depended on which CPUs the three happened to share (cross-CPU
                        # wake-ups in this VM), and the same row swung 5x between runs;
                        # pinned, the added µs is the row's own work per round trip
                        pids = [x.proc.pid for x in (r, be) if x.proc is not None]
                        for pid in pids:
                            pin_tree(pid, {0})
                        try:
                            return run_load(load, ["rr", HOST, str(r.port),
                                                   str(mode.rr_count)], timeout=60, cpus={0})
                        finally:
                            for pid in pids:
                                pin_tree(pid, every_cpu)

                    def rr(r: Row) -> None:
                        # paired with a direct run just before it: the machine drifts
                        base = rr_once(direct) if direct is not None and r is not direct else None
                        out = rr_once(r)
                        if not out:
                            return
                        res.add(r.name, "rr_p50", out["p50_us"])
                        res.add(r.name, "rr_p99", out["p99_us"])
                        if r is direct:
                            res.add(r.name, "rr_p50_added", 0.0)
                            res.add(r.name, "rr_p99_added", 0.0)
                        elif base:
                            res.add(r.name, "rr_p50_added", out["p50_us"] - base["p50_us"])
                            res.add(r.name, "rr_p99_added", out["p99_us"] - base["p99_us"])
                    interleave(rows, mode.reps, "rr", rr)
                if "churn" in rest:
                    def churn(r: Row) -> None:
                        out = churn_once(load, r, mode.churn_secs)
                        if out:
                            res.add(r.name, "churn", out[0])
                            if out[1] is not None:
                                res.add(r.name, "cpu_us_per_session", out[1])
                    interleave(rows, mode.reps, "churn", churn)
                if "mem" in rest:
                    want = idle_n if idle_n is not None else mode.idle_conns
                    has_haproxy = any(r.name.startswith("haproxy") for r in rows)
                    if want > cap or (has_haproxy and want > hcap):
                        res.notes.append(
                            f"idle connections capped at {cap}"
                            f"{f' (haproxy rows: {hcap})' if has_haproxy else ''} instead of "
                            f"{want}: RLIMIT_NOFILE is {nofile} and cannot be raised here")
                    def mem(r: Row) -> None:
                        if r.proc is None:
                            return
                        n = min(mode.fork_idle_conns if r.name in FORKING else want, row_cap(r))
                        out = idle_conns(r, n)
                        if out:
                            res.add(r.name, "kb_per_conn", out[1])
                            res.add(r.name, "idle_conns", float(out[0]))
                    interleave(rows, 1, "mem", mem)
        if "scale" in rest:
            # fresh row processes: after the mem workload's 9,750 idle connections a row
            # would hold memory enough for every point, and read about 0 KB per session
            with rows_running([n for n in names if n in SCALE_ROWS and n not in res.skipped],
                              be.port, tmp, res.skipped) as rows:
                time.sleep(0.5)  # start-up allocations settle before held() takes its base

                def scale(r: Row) -> None:
                    for n in mode.scale_points:
                        with held(r, min(n, row_cap(r))) as got:
                            if got is None:
                                continue
                            res.add(r.name, f"scale{n}_conns", float(got[0]))
                            if f"scale{n}_kb" not in res.samples.get(r.name, {}):
                                # the first rep only: later reps reuse memory the row
                                # kept from the first, and would read about zero
                                res.add(r.name, f"scale{n}_kb", got[1])
                            out = churn_once(load, r, mode.churn_secs)
                            if out and out[1] is not None:
                                res.add(r.name, f"scale{n}_cpu", out[1])
                interleave(rows, mode.reps, "scale", scale)
    finally:
        be.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    d50, d99 = res.median("direct", "rr_p50"), res.median("direct", "rr_p99")
    if d50 is not None:
        res.notes.append(f"direct round trip: p50 {d50:.1f} µs, p99 {d99 or 0:.1f} µs "
                         "(rr columns: µs added over a direct run made just before each row's run)")
    conns = {name: res.median(name, "idle_conns") for name in res.rows}
    counts = sorted({int(v) for v in conns.values() if v})
    if counts:
        res.notes.append("KB per idle conn: PSS of the process tree added per connection, "
                         f"measured at {'/'.join(str(c) for c in counts)} connections "
                         f"({', '.join(sorted(FORKING))} fork a process per connection and "
                         "get fewer); kernel socket buffers are not included")
    if "bulk" in workloads:
        res.notes.append("CPU s/GB: utime+stime of the row's process tree over the iperf3 runs; "
                         "forked children are counted via cutime/cstime and tree sampling "
                         "(best effort)")
    return res


# ------------------------------------------------------------------ output

def fmt(v: float | None, dec: int) -> str:
    return "-" if v is None else f"{v:,.{dec}f}"


def ratio(v: float | None, ref: float | None) -> str:
    return "-" if v is None or not ref or ref <= 0 else f"{v / ref:.2f}"


def tables(res: Results, markdown: bool) -> str:
    head = ["row", *[c[1] for c in COLUMNS]]
    body = [[r, *[fmt(res.median(r, k), d) for k, _, d in COLUMNS]] for r in res.rows]
    refs: list[str] = [ref for ref in ("haproxy", "haproxy-tuned", "direct")
                       if ref in res.rows]
    ratio_head = ["row"]
    ratio_cols: list[tuple[str, str]] = []
    for k, title, _ in COLUMNS:
        if k == "rr_p99_added":
            continue
        for ref in refs:
            if (ref == "haproxy" or (ref == "haproxy-tuned" and k.startswith("bulk"))
                    or (ref == "direct" and k in HIGHER_IS_BETTER)):
                ratio_cols.append((k, ref))
                ratio_head.append(f"{title.removesuffix(' Gbit/s')} ÷ {ref}")
    ratio_body = []
    for r in res.rows:
        line = [r]
        for k, ref in ratio_cols:
            line.append(ratio(res.median(r, k), res.median(ref, k)))
        ratio_body.append(line)
    out = [f"Forwarder benchmark ({res.mode}; loopback; {os.cpu_count()} CPUs; "
           f"{platform.release()}; medians)", ""]
    out += render(head, body, markdown)
    if ratio_cols:
        out += ["", "Ratios (throughput: higher is better; latency, CPU, memory: lower is "
                "better):", ""]
        out += render(ratio_head, ratio_body, markdown)
    out += scale_table(res, markdown)
    out += [""] + [f"- {n}" for n in res.notes]
    for name, why in res.skipped.items():
        out.append(f"- skipped {name}: {why}")
    return "\n".join(out)


def scale_table(res: Results, markdown: bool) -> list[str]:
    """CPU µs per churn session and KB per held session at each concurrency point, with the
    ratio to haproxy's at the same point."""
    points = sorted({int(k[5:-4]) for row in res.samples.values() for k in row
                     if k.startswith("scale") and k.endswith("_cpu")})
    rows = [r for r in res.rows if any(f"scale{n}_cpu" in res.samples.get(r, {})
                                       for n in points)]
    if not points or not rows:
        return []
    head = ["row"]
    for n in points:
        head += [f"CPU µs/session at {n:,}", f"KB/conn at {n:,}"]
    ref = "haproxy" if "haproxy" in rows else None
    if ref:
        head += [f"CPU ÷ {ref} at {n:,}" for n in points]
    body = []
    for r in rows:
        line = [r]
        for n in points:
            line += [fmt(res.median(r, f"scale{n}_cpu"), 0), fmt(res.median(r, f"scale{n}_kb"), 1)]
        if ref:
            for n in points:
                line.append(ratio(res.median(r, f"scale{n}_cpu"),
                                  res.median(ref, f"scale{n}_cpu")))
        body.append(line)
    held_n = sorted({int(v) for r in rows for n in points
                     if (v := res.median(r, f"scale{n}_conns"))})
    return (["", "Cost as concurrency grows (N sessions held open through the row, each "
             "greeted; churn beside them: CPU µs of the row per churn session; KB: PSS added "
             "per held session over the row as it stood, first rep, points in rising order, "
             "so a later point reuses what an earlier one grew):", ""]
            + render(head, body, markdown)
            + ([] if set(held_n) <= set(points) else
               ["", f"- sessions actually held: {', '.join(f'{c:,}' for c in held_n)} "
                "(capped by RLIMIT_NOFILE or haproxy's maxconn)"]))


def render(head: list[str], body: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(head) + " |",
                 "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
        return lines + ["| " + " | ".join(row) + " |" for row in body]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                      for i, (c, w) in enumerate(zip(x, widths, strict=True)))
            for x in [head, *body]]


def to_json(res: Results) -> dict[str, Any]:
    keys = sorted({k for row in res.samples.values() for k in row})
    return {"mode": res.mode, "cpus": os.cpu_count(), "kernel": platform.release(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": res.rows,
            "medians": {r: {k: res.median(r, k) for k in keys} for r in res.rows},
            "samples": res.samples, "skipped": res.skipped, "notes": res.notes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.perf.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="1 rep, short runs (~2 min)")
    g.add_argument("--smoke", action="store_true",
                   help="tiny run for tests: direct, forwarder and haproxy, ~0.5-1 s each")
    p.add_argument("--rows", help=f"comma-separated subset of: {','.join(ALL_ROWS)}")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated subset of: {','.join(WORKLOADS)}")
    p.add_argument("--idle-conns", type=int, help="idle connections for the mem workload")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    p.add_argument("--markdown", action="store_true", help="markdown tables (for the README)")
    p.add_argument("--baseline", metavar="EXE",
                   help="forwarder executable of another build for the forwarder-base row")
    ns = p.parse_args(argv)
    if ns.baseline:
        BASELINE.append(ns.baseline)
    mode = MODES["smoke" if ns.smoke else "quick" if ns.quick else "full"]
    if ns.rows:
        names = [n.strip() for n in ns.rows.split(",") if n.strip()]
    elif ns.smoke:
        names = ["direct", "forwarder", "haproxy"]
    else:
        names = list(ALL_ROWS)
    bad = [n for n in names if n not in ALL_ROWS]
    workloads = [w.strip() for w in ns.workloads.split(",") if w.strip()]
    bad += [w for w in workloads if w not in WORKLOADS]
    if bad:
        p.error(f"unknown row or workload: {', '.join(bad)}")
    if "rr" in workloads and "direct" not in names:
        names.insert(0, "direct")  # the rr columns are relative to direct
    t0 = time.monotonic()

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # so run()'s finally stops every row it started

    signal.signal(signal.SIGTERM, interrupted)
    res = run(names, mode, workloads, ns.idle_conns)
    log(f"done in {time.monotonic() - t0:.0f} s")
    print(tables(res, ns.markdown))
    if ns.json:
        Path(ns.json).write_text(json.dumps(to_json(res), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
