"""Command line: the one-liner, `run`, `check-config`, `convert-xinetd`, `status`.

Every config source goes through the same steps: read (TOML, xinetd files, flags), the
shared checks, the command-line options on top (`--user`, `--admin`, `--log-*` ... apply
to xinetd files too), then the load step that resolves names.  A file may be given as a
positional argument or with --config everywhere.

Exit codes: 0 ok, 1 unexpected error, 2 bad usage or bad config, 3 the environment refused
(a bind, a user lookup, the privilege drop).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from .config import load
from .config.checks import worker_count
from .config.cli_args import Overrides, apply, from_cli
from .config.model import Config, ConfigError
from .config.toml import load_toml, to_dict, to_toml
from .ops import logs, supervise, system

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_SYSTEM = 0, 1, 2, 3
COMMANDS = ("run", "check-config", "convert-xinetd", "status")
DEFAULT_ADMIN = "127.0.0.1:9125"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 with usage: keep that
        self.print_usage(sys.stderr)
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message}\n")


def _log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=("auto", "json", "console"), default=None,
                   help="log format (default: json unless stdout is a terminal)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=None)


def _override_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user", help="user to drop to when started as root (default nobody; "
                                  "root only when given explicitly)")
    p.add_argument("--group", help="group to drop to (default: the user's group)")
    p.add_argument("--admin", metavar="ADDR:PORT", help="admin HTTP listener (/metrics ...)")
    p.add_argument("--workers", type=_workers, metavar="N|auto",
                   help="worker processes accepting and relaying (auto: one per CPU)")
    _log_args(p)


def _workers(v: str) -> int | str:
    if v == "auto":
        return v
    n = int(v)
    if not 1 <= n <= 256:
        raise argparse.ArgumentTypeError("expected auto or 1..256")
    return n


def _oneliner_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="forwarder",
        usage="forwarder --listen ADDR:PORT --backend HOST:PORT [options]\n"
              "       forwarder --xinetd FILE [options]\n"
              "       forwarder {run,check-config,convert-xinetd,status} ... "
              "(forwarder CMD --help)",
        description="Health-aware TCP port forwarder: listens only while a backend is alive.")
    p.add_argument("--version", action="version", version=f"forwarder {__version__}")
    p.add_argument("--listen", metavar="ADDR:PORT",
                   help="address to listen on (omit under systemd socket activation)")
    p.add_argument("--backend", metavar="HOST:PORT", action="append", default=[],
                   help="backend; repeat for peers (the first is local)")
    p.add_argument("--probe", choices=("tcp", "smtp"), help="probe kind (default: by mode)")
    p.add_argument("--mode", choices=("smtp", "tcp"),
                   help="smtp: 421 when no backend; tcp: close (default: smtp for port 25)")
    p.add_argument("--interval", type=float, help="probe interval in seconds (default 2)")
    p.add_argument("--xinetd", metavar="FILE",
                   help="run the redirect services of an xinetd config file or directory")
    p.add_argument("--skip-unsupported", action="store_true",
                   help="with --xinetd: skip services we cannot run instead of refusing")
    _override_args(p)
    return p


def _overrides(ns: argparse.Namespace) -> Overrides:
    return Overrides(user=ns.user, group=ns.group, admin=ns.admin,
                     probe=getattr(ns, "probe", None), mode=getattr(ns, "mode", None),
                     interval=getattr(ns, "interval", None), log_format=ns.log_format,
                     log_level=ns.log_level, workers=ns.workers)


def _read_xinetd(path: str, skip: bool, o: Overrides) -> Config:
    from .config import xinetd
    return load.resolve(apply(xinetd.load(path, skip_unsupported=skip), o))


def _read_toml(path: str, o: Overrides) -> Config:
    return load.resolve(apply(load_toml(path), o))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in COMMANDS:
            return _subcommand(args[0], args[1:])
        if not args:
            _oneliner_parser().print_help(sys.stderr)
            return EXIT_CONFIG
        return _oneliner(args)
    except ConfigError as e:
        print(f"forwarder: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except system.SystemError_ as e:
        print(f"forwarder: {e}", file=sys.stderr)
        return EXIT_SYSTEM


def _oneliner(args: list[str]) -> int:
    ns = _oneliner_parser().parse_args(args)
    o = _overrides(ns)
    reloader: Callable[[], Config] | None = None
    activated = system.activated_sockets()
    if ns.xinetd:
        if ns.listen or ns.backend:
            raise ConfigError("--xinetd takes the listen address and backend from the file; "
                              "drop --listen/--backend", key="--xinetd")
        path, skip = ns.xinetd, ns.skip_unsupported
        logs.setup(ns.log_format or "auto", ns.log_level or "info")  # skipped services
        cfg = _read_xinetd(path, skip, o)
        reloader = lambda: _read_xinetd(path, skip, o)  # noqa: E731
    else:
        listen = ns.listen
        if listen is None:
            if not activated:
                raise ConfigError("missing: --listen ADDR:PORT (or run under systemd socket "
                                  "activation)", key="--listen")
            listen = "127.0.0.1:1"  # placeholder, replaced by the passed sockets
        cfg = from_cli(listen, ns.backend, o)
        if ns.listen is None:
            from .service import cli_listener_for_activation
            cfg = cli_listener_for_activation(cfg, activated)
        cfg = load.resolve(cfg)
    return _run(cfg, reloader, activated)


def _file_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("file", nargs="?", help=what)
    p.add_argument("--config", "-c", dest="config", metavar="FILE", help=what)


def _file(p: argparse.ArgumentParser, ns: argparse.Namespace) -> str:
    if ns.file and ns.config and ns.file != ns.config:
        p.error("give the file once: positional or --config")
    path = ns.file or ns.config
    if not path:
        p.error("the config file is missing")
    return str(path)


def _subcommand(cmd: str, args: list[str]) -> int:
    p = _Parser(prog=f"forwarder {cmd}")
    if cmd == "run":
        _file_arg(p, "TOML config file")
        _override_args(p)
        ns = p.parse_args(args)
        path, o = _file(p, ns), _overrides(ns)
        return _run(_read_toml(path, o), lambda: _read_toml(path, o),
                    system.activated_sockets())
    if cmd == "check-config":
        _file_arg(p, "TOML config (or xinetd file with --xinetd)")
        p.add_argument("--xinetd", action="store_true", help="FILE is an xinetd config")
        p.add_argument("--skip-unsupported", action="store_true")
        p.add_argument("--json", action="store_true", help="print the effective config as JSON")
        ns = p.parse_args(args)
        path = _file(p, ns)
        cfg = (_read_xinetd(path, ns.skip_unsupported, Overrides()) if ns.xinetd
               else _read_toml(path, Overrides()))
        for w in cfg.warnings:
            print(f"forwarder: warning: {w}", file=sys.stderr)
        print(json.dumps(to_dict(cfg), indent=2) if ns.json else to_toml(cfg), end="")
        return EXIT_OK
    if cmd == "convert-xinetd":
        _file_arg(p, "xinetd.conf, a service file or an xinetd.d directory")
        p.add_argument("--skip-unsupported", action="store_true")
        ns = p.parse_args(args)
        logs.setup("console", "info", stream=sys.stderr)  # the TOML goes to stdout
        from .config import xinetd
        cfg = xinetd.load(_file(p, ns), skip_unsupported=ns.skip_unsupported)
        print(to_toml(cfg, from_xinetd=True), end="")
        return EXIT_OK
    return _status(p, args)


def _status(p: argparse.ArgumentParser, args: list[str]) -> int:
    p.add_argument("--admin", metavar="ADDR:PORT",
                   help=f"the forwarder's admin listener (default: from --config or "
                        f"--xinetd, else {DEFAULT_ADMIN})")
    p.add_argument("--config", "-c", metavar="FILE", help="find the admin address here")
    p.add_argument("--xinetd", metavar="FILE", help="find the admin address here")
    p.add_argument("--json", action="store_true")
    p.add_argument("--events", action="store_true",
                   help="print the recent events (gate and backend changes, drains, "
                        "reloads: when, what and why) instead of the status")
    p.add_argument("--since", metavar="SEQ", type=int, default=0,
                   help="with --events: only events after this seq")
    ns = p.parse_args(args)
    admin = ns.admin
    if admin is None and (ns.config or ns.xinetd):
        from .config import xinetd
        cfg = xinetd.load(ns.xinetd) if ns.xinetd else load_toml(ns.config)
        if cfg.admin is None:
            raise ConfigError("has no admin address: give --admin ADDR:PORT",
                              file=ns.config or ns.xinetd, key="admin")
        admin = str(cfg.admin)
    admin = admin or DEFAULT_ADMIN
    path = f"/events?since={max(0, ns.since)}" if ns.events else "/status"
    try:
        with urllib.request.urlopen(f"http://{admin}{path}", timeout=5) as r:
            data = json.load(r)
    except urllib.request.HTTPError as e:
        hint = " (a forwarder older than `status --events`)" if e.code == 404 else ""
        print(f"forwarder status: http://{admin}{path}: {e.code} {e.reason}{hint}",
              file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:
        print(f"forwarder status: cannot reach http://{admin}{path}: {e}", file=sys.stderr)
        return EXIT_ERROR
    if ns.json:
        print(json.dumps(data, indent=2))
    else:
        print(_format_events(data) if ns.events else _format_status(data))
    return EXIT_OK


def _format_status(data: dict[str, Any]) -> str:
    lines = []
    for lst in data.get("listeners", []):
        g = lst["gate"]
        lines.append(f"{lst['name']} {','.join(lst['addresses'])}: gate {g['state']} "
                     f"({g['reason']}{', drained' if g.get('drained') else ''}), "
                     f"{lst['connections_active']} active")
        if g.get("open_error"):
            e = g["open_error"]
            lines.append(f"  listen() failed on {e['address']}: {e['error']}"
                         f"{' (held by ' + e['holder'] + ')' if e.get('holder') else ''}, "
                         f"{e['failures']} attempts, retrying")
        for b in lst["backends"]:
            last = b["history"][0] if b["history"] else None
            lines.append(f"  {'UP  ' if b['up'] else 'DOWN'} {b['name']:<28} "
                         f"{'local' if b['local'] else b['source']:<7} "
                         f"last: {last['result'] + ' ' + last['detail'] if last else '-'}")
    return "\n".join(lines)


_EVENT_SUBJECT = ("listener", "backend", "listeners")
_EVENT_SHOWN = {"seq", "time", "kind", "reason", *_EVENT_SUBJECT}


def _format_events(events: list[dict[str, Any]]) -> str:
    """One line an event, oldest first: local time, seq, kind, listener or backend, reason
    and any other field as k=v."""
    import time

    lines = []
    for ev in events:
        subject = ""
        for k in _EVENT_SUBJECT:
            if v := ev.get(k):
                subject = ",".join(map(str, v)) if isinstance(v, list) else str(v)
                break
        t = ev.get("time")
        when = "?"
        if isinstance(t, int | float):
            ms = int(t * 1000) % 1000
            when = f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t))}.{ms:03d}"
        rest = " ".join(f"{k}={v}" for k, v in ev.items()
                        if k not in _EVENT_SHOWN and v is not None)
        lines.append(f"{when}  #{ev.get('seq', '?'):<5} {ev.get('kind', '?'):<24} "
                     f"{subject:<24} {ev.get('reason') or '-'}{'  ' + rest if rest else ''}")
    return "\n".join(lines) if lines else "no events"


def _run(cfg: Config, reloader: Callable[[], Config] | None, activated: list[Any]) -> int:
    logs.setup(cfg.log.format, cfg.log.level)
    from .service import Service, bind_all

    for s in activated:  # logged only now: logging is set up after the sockets were taken
        system.log.info(
            "activation.socket", fd=s.fileno(), name=s.fd_name,
            address=":".join(map(str, s.getsockname()[:2])))

    socks = bind_all(cfg, activated)
    admin_sock = system.bind(cfg.admin, claim=False) if cfg.admin is not None else None
    system.log.debug("rlimit.nofile", soft=system.raise_nofile())
    loop_factory = _loop_factory()
    _preimport()
    try:
        system.drop_privileges(cfg.user, cfg.group)
    except (OSError, system.SystemError_) as e:
        raise system.SystemError_(f"cannot drop privileges: {e}") from None
    supervise.settle()  # before the fork: the fork server and workers share these pages
    workers = worker_count(cfg)
    zygote = None
    if workers > 1:  # forked now: no event loop exists yet (workers/zygote.py)
        from .workers import worker
        from .workers.zygote import Zygote
        zygote = Zygote.fork(worker.main)

    async def go() -> int:
        return await Service(cfg, socks, reloader=reloader, activated=activated,
                             admin_sock=admin_sock, zygote=zygote, workers=workers).run()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(go())


def _preimport() -> None:
    """Import now what the loop imports lazily later: after the privilege drop the Python
    installation may not be readable any more (a pyenv under /root, for one)."""
    import importlib

    for name in ("concurrent.futures.thread", "forwarder.ops.admin", "forwarder.config.xinetd",
                 "forwarder.health.discovery", "forwarder.workers.worker",
                 "forwarder.workers.hub", "encodings.idna", "encodings.ascii"):
        importlib.import_module(name)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        import structlog
        structlog.get_logger("forwarder").warning(
            "uvloop.missing", detail="uvloop is not installed; using asyncio's default loop")
        return None
    return uvloop.new_event_loop
