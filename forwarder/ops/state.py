"""Operator state that must outlive the process: which listeners are drained.

HAProxy forgets a drain set over its runtime API when it reloads (haproxy#477); a forwarder
restarted during maintenance must not reopen the port.  The file is written atomically (a
temporary file renamed over the old one); one that cannot be read or written is logged,
and the drain itself still applies to the running process.
"""

from __future__ import annotations

import json
import os

import structlog

from ..config.model import Config

log = structlog.get_logger("forwarder.state")


def state_path(cfg: Config) -> str | None:
    """`state_file`, else state.json in systemd's StateDirectory= (STATE_DIRECTORY)."""
    if cfg.state_file:
        return cfg.state_file
    d = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return os.path.join(d, "state.json") if d else None


class State:
    """The drained listeners, kept in `path` (None: not kept)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.drained: set[str] = set()
        if path is None:
            return
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            self.drained = {str(n) for n in data.get("drained", [])}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as e:
            log.error("state.unreadable", state_file=path, error=str(e),
                      detail="starting without the drains it may have held")

    def set_drained(self, names: set[str]) -> None:
        changed, self.drained = names != self.drained, names
        if self.path is None or not changed:
            return
        tmp = f"{self.path}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"drained": sorted(names)}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            log.error("state.unwritable", state_file=self.path, error=e.strerror,
                      detail="the drain applies now but would not survive a restart")
