"""Network namespaces for tests: created, wired with veth pairs, and always removed.

Only addresses inside namespaces the test itself creates are used (10.x here never leaves
this machine: the veth pairs connect our own namespaces to each other or to the host).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=10)


class Netns:
    """One namespace; `exec` prefixes a command to run inside it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.etc = Path("/etc/netns") / name

    def create(self) -> Netns:
        ip("netns", "add", self.name)
        ip("link", "set", "lo", "up", ns=self.name)
        return self

    def exec(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def write_etc(self, filename: str, text: str) -> None:
        """/etc/netns/NAME/FILE is bind-mounted over /etc/FILE by `ip netns exec`."""
        self.etc.mkdir(parents=True, exist_ok=True)
        (self.etc / filename).write_text(text)

    def delete(self) -> None:
        ip("netns", "del", self.name, check=False)
        shutil.rmtree(self.etc, ignore_errors=True)


def unique(prefix: str) -> str:
    return f"{prefix}{os.getpid() % 100000}"


@contextlib.contextmanager
def namespaces(*names: str) -> Iterator[dict[str, Netns]]:
    made: dict[str, Netns] = {}
    try:
        for n in names:
            made[n] = Netns(n).create()
        yield made
    finally:
        for ns in made.values():
            ns.delete()


def veth(a: str, b: str, ns_a: str | None, addr_a: str, ns_b: str | None, addr_b: str) -> None:
    """A veth pair a<->b, each end moved into its namespace (None: the host) with an
    address (CIDR).  Deleting a namespace deletes its end, and with it the pair."""
    ip("link", "add", a, "type", "veth", "peer", "name", b)
    for dev, ns, addr in ((a, ns_a, addr_a), (b, ns_b, addr_b)):
        if ns:
            ip("link", "set", dev, "netns", ns)
        ip("addr", "add", addr, "dev", dev, ns=ns)
        ip("link", "set", dev, "up", ns=ns)


def delete_link(name: str) -> None:
    ip("link", "del", name, check=False)
