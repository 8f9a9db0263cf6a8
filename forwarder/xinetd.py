"""xinetd configuration reader.  Placeholder: `load()` is the contract cli.py uses."""

from __future__ import annotations

from .config import Config, ConfigError


def load(path: str, *, skip_unsupported: bool = False) -> Config:
    raise ConfigError("xinetd files are not supported yet", file=path)
