"""The command line as config: the one-liner (`--listen ADDR:PORT --backend HOST:PORT ...`)
builds a Config; with `--xinetd` the same options apply on top of what the files say.

Errors name the flag.  The rules are the shared ones (checks.validate), so a one-liner is
held to exactly what a TOML file is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from .checks import validate
from .model import (
    BackendConfig,
    Config,
    ConfigError,
    ListenerConfig,
    LogConfig,
    Mode,
    Place,
    ProbeConfig,
    ProbeKind,
    default_probe_kind,
    parse_endpoint,
)

_FLAGS = {"addresses": "--listen", "backend": "--backend", "admin": "--admin",
          "probe.timeout": "--interval", "name": "--listen", "gate": "--backend"}


class _FlagPlace(Place):
    def key(self, index: int | None, name: str) -> tuple[str, int | None]:
        return _FLAGS.get(name, name), None


@dataclass(frozen=True)
class Overrides:
    """What the command line says beyond the config source; None: not given."""

    user: str | None = None
    group: str | None = None
    admin: str | None = None
    probe: ProbeKind | None = None
    mode: Mode | None = None
    interval: float | None = None
    log_format: str | None = None
    log_level: str | None = None
    workers: int | Literal["auto"] | None = None


def _flag(fn: Any, value: str, flag: str) -> Any:
    try:
        return fn(value, flag)
    except ConfigError as e:
        raise ConfigError(e.message, key=flag) from None


def _interval(interval: float) -> float:
    if interval <= 0:
        raise ConfigError(f"must be > 0, got {interval}", key="--interval")
    return interval


def from_cli(listen: str, backends: list[str], o: Overrides) -> Config:
    """Build a config from `--listen/--backend` flags."""
    lep = _flag(parse_endpoint, listen, "--listen")
    if not backends:
        raise ConfigError("missing: at least one --backend HOST:PORT", key="--backend")
    beps = [_flag(parse_endpoint, b, "--backend") for b in backends]
    mode = o.mode or ("smtp" if o.probe == "smtp" or lep.port == 25 else "tcp")
    pc = ProbeConfig(kind=o.probe or default_probe_kind(mode))
    if o.interval is not None:
        pc = replace(pc, interval=_interval(o.interval))
    lc = ListenerConfig(
        name="default", addresses=(lep.host,), port=lep.port,
        backends=tuple(BackendConfig(ep, priority=i, local=i == 0) for i, ep in enumerate(beps)),
        mode=mode, probe=pc, gate="local")
    cfg = Config(listeners=(lc,), places=_FlagPlace("<command line>"))
    return apply(cfg, replace(o, probe=None, mode=None, interval=None))


def apply(cfg: Config, o: Overrides) -> Config:
    """Command-line options over a config read from files (xinetd), checked again."""
    listeners = []
    for lc in cfg.listeners:
        if o.mode is not None:
            lc = replace(lc, mode=o.mode)
        if o.probe is not None or o.mode is not None:
            lc = replace(lc, probe=replace(lc.probe,
                                           kind=o.probe or default_probe_kind(lc.mode)))
        if o.interval is not None:
            lc = replace(lc, probe=replace(lc.probe, interval=_interval(o.interval)))
        listeners.append(lc)
    log = cfg.log
    if o.log_format is not None:
        log = replace(log, format=o.log_format)  # type: ignore[arg-type]
    if o.log_level is not None:
        log = replace(log, level=o.log_level)  # type: ignore[arg-type]
    out = replace(cfg, listeners=tuple(listeners), log=LogConfig(log.format, log.level),
                  user=o.user if o.user is not None else cfg.user,
                  group=o.group if o.group is not None else cfg.group,
                  admin=(_flag(parse_endpoint, o.admin, "--admin") if o.admin is not None
                         else cfg.admin),
                  workers=o.workers if o.workers is not None else cfg.workers)
    return validate(out)
