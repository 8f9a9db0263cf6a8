#!/usr/bin/env python3
"""Writes docs/status-page.png, the README's picture of the status page (GET / on the admin
listener): a real forwarder with two backends, one up and one that never answers, a few
mails relayed through it, rendered by headless Chromium.

    .venv/bin/python dashboards/screenshot.py                  # docs/status-page.png
    .venv/bin/python dashboards/screenshot.py --out /tmp/x.png

Needs Debian's `chromium` (`make test` installs it) and the dev extras (aiosmtpd).
"""

from __future__ import annotations

import argparse
import json
import smtplib
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.chromium import screenshot  # noqa: E402
from tests.helpers import Forwarder, SmtpBackend, free_port, wait_until  # noqa: E402

PROBES = 16  # marks in each backend's history before the picture is taken
MAILS = 5


def config(port: int, admin: int, up: int, down: int) -> str:
    return f"""
admin = "127.0.0.1:{admin}"
[[listener]]
name = "smtp"
address = "127.0.0.1"
port = {port}
gate = "any"
[[listener.backends]]
address = "127.0.0.1:{up}"
[[listener.backends]]
address = "127.0.0.1:{down}"
[listener.probe]
kind = "smtp"
interval = 0.2
fast_interval = 0.1
timeout = 1
"""


def probes(admin: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=5) as r:
        st = json.load(r)
    return min(len(b["history"]) for b in st["listeners"][0]["backends"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "status-page.png")
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=720)
    ns = ap.parse_args()
    port, admin, down = free_port(), free_port(), free_port()
    with SmtpBackend() as be, Forwarder(config(port, admin, be.port, down)) as fw:
        fw.wait_event("gate.open")
        fw.wait_event("probe.failed", backend=f"127.0.0.1:{down}")
        for i in range(MAILS):
            with smtplib.SMTP("127.0.0.1", port, timeout=15) as c:
                c.sendmail("alice@example.org", ["bob@example.net"],
                           f"Subject: hello {i}\r\n\r\nmessage {i}\r\n")
        be.wait_messages(MAILS)
        wait_until(lambda: probes(admin) >= PROBES, 30, f"{PROBES} probes of each backend",
                   interval=0.1)
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        screenshot(f"http://127.0.0.1:{admin}/", ns.out, ns.width, ns.height)
    print(f"wrote {ns.out} ({ns.out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
