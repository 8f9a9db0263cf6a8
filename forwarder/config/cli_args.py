"""The one-liner: `forwarder --listen ADDR:PORT --backend HOST:PORT ...` as a Config."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .model import (
    BackendConfig,
    Config,
    ConfigError,
    ListenerConfig,
    Mode,
    ProbeConfig,
    ProbeKind,
    RelayKind,
    parse_endpoint,
)


def from_cli(listen: str, backends: list[str], *, probe: ProbeKind | None = None,
             mode: Mode | None = None, user: str | None = None, group: str | None = None,
             admin: str | None = None, interval: float | None = None,
             relay: RelayKind | None = None) -> Config:
    """Build a config from `--listen/--backend` flags; errors name the flag."""
    lep = _flag(parse_endpoint, listen, "--listen")
    if not backends:
        raise ConfigError("missing: at least one --backend HOST:PORT", key="--backend")
    beps = [_flag(parse_endpoint, b, "--backend") for b in backends]
    if mode is None:
        mode = "smtp" if probe == "smtp" or lep.port == 25 else "tcp"
    kind: ProbeKind = probe or ("smtp" if mode == "smtp" else "tcp")
    pc = ProbeConfig(kind=kind)
    if interval is not None:
        if interval <= 0:
            raise ConfigError(f"must be > 0, got {interval}", key="--interval")
        pc = replace(pc, interval=interval)
    lc = ListenerConfig(
        name="default", addresses=(lep.host,), port=lep.port,
        backends=tuple(BackendConfig(ep, priority=i, local=i == 0) for i, ep in enumerate(beps)),
        mode=mode, probe=pc, gate="local", relay=relay or "auto")
    return Config(listeners=(lc,), user=user, group=group,
                  admin=_flag(parse_endpoint, admin, "--admin") if admin else None)


def _flag(fn: Any, value: str, flag: str) -> Any:
    try:
        return fn(value, flag)
    except ConfigError as e:
        raise ConfigError(e.message, key=flag) from None


