"""Command line: the one-liner, `run --config`, `check-config`, `convert-xinetd`, `status`.

Exit codes: 0 ok, 1 unexpected error, 2 bad usage or bad config, 3 the environment refused
(bind, user lookup, privilege drop).
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
from .config.cli_args import from_cli
from .config.model import Config, ConfigError
from .config.toml import load_toml, to_dict, to_toml
from .ops import logs, system

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_SYSTEM = 0, 1, 2, 3
COMMANDS = ("run", "check-config", "convert-xinetd", "status")


def _log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=("auto", "json", "console"), default=None,
                   help="log format (default: json unless stdout is a terminal)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=None)


def _oneliner_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="forwarder",
        description="Health-aware TCP port forwarder: listens only while a backend is alive. "
                    f"Subcommands: {', '.join(COMMANDS)} (forwarder CMD --help).")
    p.add_argument("--version", action="version", version=f"forwarder {__version__}")
    p.add_argument("--listen", metavar="ADDR:PORT",
                   help="address to listen on (omit under systemd socket activation)")
    p.add_argument("--backend", metavar="HOST:PORT", action="append", default=[],
                   help="backend; repeat for peers (the first is local)")
    p.add_argument("--probe", choices=("tcp", "smtp"), help="probe kind (default: by mode)")
    p.add_argument("--mode", choices=("smtp", "tcp"),
                   help="smtp: 421 when no backend; tcp: close (default: smtp for port 25)")
    p.add_argument("--interval", type=float, help="probe interval in seconds (default 2)")
    p.add_argument("--relay", choices=("auto", "protocol", "splice"),
                   help="data path: asyncio protocols, or Linux os.splice() (default auto)")
    p.add_argument("--user", help="user to drop to when started as root (default nobody)")
    p.add_argument("--group", help="group to drop to (default: the user's group)")
    p.add_argument("--admin", metavar="ADDR:PORT", help="admin HTTP listener (/metrics ...)")
    p.add_argument("--xinetd", metavar="FILE",
                   help="run the redirect services of an xinetd config file or directory")
    p.add_argument("--skip-unsupported", action="store_true",
                   help="with --xinetd: skip services we cannot run instead of refusing")
    _log_args(p)
    return p


def _load_xinetd(path: str, skip: bool) -> Config:
    from .config import xinetd
    return xinetd.load(path, skip_unsupported=skip)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in COMMANDS:
            return _subcommand(args[0], args[1:])
        return _oneliner(args)
    except ConfigError as e:
        print(f"forwarder: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except system.SystemError_ as e:
        print(f"forwarder: {e}", file=sys.stderr)
        return EXIT_SYSTEM


def _oneliner(args: list[str]) -> int:
    ns = _oneliner_parser().parse_args(args)
    reloader: Callable[[], Config] | None = None
    activated = system.activated_sockets()
    if ns.xinetd:
        path, skip = ns.xinetd, ns.skip_unsupported
        logs.setup(ns.log_format or "auto", ns.log_level or "info")  # skipped services
        cfg = _load_xinetd(path, skip)
        reloader = lambda: _load_xinetd(path, skip)  # noqa: E731
    else:
        listen = ns.listen
        if listen is None:
            if not activated:
                raise ConfigError("missing: --listen ADDR:PORT (or run under systemd socket "
                                  "activation)", key="--listen")
            listen = "127.0.0.1:1"  # placeholder, replaced by the passed sockets
        cfg = from_cli(listen, ns.backend, probe=ns.probe, mode=ns.mode, user=ns.user,
                       group=ns.group, admin=ns.admin, interval=ns.interval, relay=ns.relay)
        if ns.listen is None:
            from .service import cli_listener_for_activation
            cfg = cli_listener_for_activation(cfg, activated)
    return _run(cfg, ns, reloader, activated)


def _subcommand(cmd: str, args: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"forwarder {cmd}")
    if cmd == "run":
        p.add_argument("--config", "-c", required=True, help="TOML config file")
        _log_args(p)
        ns = p.parse_args(args)
        path = ns.config
        return _run(load_toml(path), ns, lambda: load_toml(path), system.activated_sockets())
    if cmd == "check-config":
        p.add_argument("file", help="TOML config (or xinetd file with --xinetd)")
        p.add_argument("--xinetd", action="store_true", help="FILE is an xinetd config")
        p.add_argument("--skip-unsupported", action="store_true")
        p.add_argument("--json", action="store_true", help="print the effective config as JSON")
        ns = p.parse_args(args)
        cfg = _load_xinetd(ns.file, ns.skip_unsupported) if ns.xinetd else load_toml(ns.file)
        print(json.dumps(to_dict(cfg), indent=2) if ns.json else to_toml(cfg), end="")
        return EXIT_OK
    if cmd == "convert-xinetd":
        p.add_argument("file", help="xinetd.conf, a service file or an xinetd.d directory")
        p.add_argument("--skip-unsupported", action="store_true")
        ns = p.parse_args(args)
        print(to_toml(_load_xinetd(ns.file, ns.skip_unsupported)), end="")
        return EXIT_OK
    # status
    p.add_argument("--admin", default="127.0.0.1:9125", metavar="ADDR:PORT",
                   help="the forwarder's admin listener")
    p.add_argument("--json", action="store_true")
    ns = p.parse_args(args)
    try:
        with urllib.request.urlopen(f"http://{ns.admin}/status", timeout=5) as r:
            data = json.load(r)
    except OSError as e:
        print(f"forwarder status: cannot reach http://{ns.admin}/status: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(data, indent=2) if ns.json else _format_status(data))
    return EXIT_OK


def _format_status(data: dict[str, Any]) -> str:
    lines = []
    for lst in data.get("listeners", []):
        g = lst["gate"]
        lines.append(f"{lst['name']} {','.join(lst['addresses'])}: gate {g['state']} "
                     f"({g['reason']}{', drained' if g.get('drained') else ''}), "
                     f"{lst['connections_active']} active")
        for b in lst["backends"]:
            last = b["history"][0] if b["history"] else None
            lines.append(f"  {'UP  ' if b['up'] else 'DOWN'} {b['name']:<28} "
                         f"{'local' if b['local'] else b['source']:<7} "
                         f"last: {last['result'] + ' ' + last['detail'] if last else '-'}")
    return "\n".join(lines)


def _run(cfg: Config, ns: argparse.Namespace, reloader: Callable[[], Config] | None,
         activated: list[Any]) -> int:
    logs.setup(ns.log_format or cfg.log.format, ns.log_level or cfg.log.level)
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

    async def go() -> int:
        return await Service(cfg, socks, reloader=reloader, activated=bool(activated),
                             admin_sock=admin_sock).run()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(go())


def _preimport() -> None:
    """Import now what the loop imports lazily later: after the privilege drop the Python
    installation may not be readable any more (a pyenv under /root, for one)."""
    import importlib

    for name in ("concurrent.futures.thread", "forwarder.ops.admin", "forwarder.health.discovery",
                 "encodings.idna", "encodings.ascii"):
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
