"""A small mail network in network namespaces, for real MTAs delivering by MX.

    snd (10.99.1.1, 10.99.2.1)  the sending MTA (tests/e2e/mtas.py); dnsmasq on 127.0.0.1:53
                                 serving test.example MX 5 mx1, MX 10 mx2
    mx1 (10.99.1.2)             port 25: the forwarder (or xinetd, for comparison)
                                 in front of 127.0.0.1:8025 (aiosmtpd Maildir, or a hung one)
    mx2 (10.99.2.2)             port 25: the forwarder in front of 127.0.0.1:8025 (aiosmtpd)

`mailnet()` creates the namespaces, wires them and starts dnsmasq; everything started
through a `MailNet` is stopped by its pid and every namespace removed when it exits, also
when the test failed.  Where a message arrived is read from the two Maildirs by its
Message-ID.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..conftest import need_root, need_tool
from ..helpers import Forwarder, forwarder_cmd, wait_until
from ..netns import Netns, namespaces, unique, veth

DOMAIN = "test.example"
MX1, MX2, SND1, SND2 = "10.99.1.2", "10.99.2.2", "10.99.1.1", "10.99.2.1"
SENDER = f"sender@sender.{DOMAIN}"
RCPT = f"user@{DOMAIN}"
ADMIN = "127.0.0.1:9125"  # the forwarder's admin listener, on each MX namespace's own loopback

HUNG = """\
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8025))
s.listen(128)
print("listening", flush=True)
held = []
while True:  # accept and never say a word: a stuck JVM
    held.append(s.accept()[0])
"""


@dataclass(frozen=True)
class Message:
    """One test message; found again in a Maildir by its Message-ID."""

    n: int
    tag: str = "e2e"
    sender: str = SENDER
    rcpt: str = RCPT

    @property
    def message_id(self) -> str:
        return f"<{self.tag}-{self.n}.{os.getpid()}@sender.{DOMAIN}>"

    @property
    def text(self) -> str:
        return (f"From: {self.sender}\nTo: {self.rcpt}\nSubject: {self.tag} {self.n}\n"
                f"Message-ID: {self.message_id}\n\nmessage {self.n}\n")


@dataclass(frozen=True)
class Result:
    """What one message did: seconds until the MTA was done with it, the MX hosts it
    arrived at, how many messages the MTA left queued, and its transcript."""

    seconds: float
    where: str
    queued: int
    transcript: str


class Proc:
    """A process started inside a namespace (`ip netns exec` execs it: the pid is the
    process's own), stopped by its pid."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None,
                 own_group: bool = False) -> None:
        """own_group: in a session and process group of its own (a daemon that stops its
        children by signalling its group, as Postfix's master does)."""
        self.log = log
        with open(log, "ab") as out:
            self.p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=own_group)

    @property
    def pid(self) -> int:
        return self.p.pid

    def freeze(self) -> None:
        """SIGSTOP: its sockets stay open and the kernel keeps completing handshakes on its
        listening socket, but nothing answers: a hung process, from one instant to the next."""
        self.p.send_signal(signal.SIGSTOP)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.p.pid, signal.SIGCONT)  # a frozen process takes it on waking
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)

    def kill(self) -> None:
        """SIGKILL, at once (a backend dying, not shutting down)."""
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(5)


def port_state(ns: Netns, host: str, port: int) -> str:
    code = ("import socket,sys\ns=socket.socket();s.settimeout(1)\n"
            "try:\n s.connect((sys.argv[1],int(sys.argv[2])));print('open')\n"
            "except ConnectionRefusedError:\n print('refused')\n"
            "except OSError as e:\n print('error',e)\n")
    r = subprocess.run([*ns.exec(), sys.executable, "-c", code, host, str(port)],
                       capture_output=True, text=True, timeout=10)
    return r.stdout.strip()


def add_users(ns: Netns, users: Sequence[str], groups: Sequence[str] = ()) -> dict[str, int]:
    """Accounts that exist only inside `ns`: its /etc/netns/NAME/passwd and group are the
    host's files plus these, and `ip netns exec` bind-mounts them over /etc/passwd and
    /etc/group for every process started there.  An MTA's compiled-in accounts (Exim's
    Debian-exim, Postfix's postfix and postdrop) are made by its package's maintainer
    scripts, which a `dpkg -x` never runs; so the host's account database is left alone.
    Each user gets a group of its own name.  Returns name -> uid (users) or gid (groups);
    a name the host already has keeps its id."""
    pw_path, gr_path = ns.etc / "passwd", ns.etc / "group"
    passwd = (pw_path if pw_path.exists() else Path("/etc/passwd")).read_text()
    group = (gr_path if gr_path.exists() else Path("/etc/group")).read_text()

    def table(text: str) -> dict[str, int]:
        rows = [line.split(":") for line in text.splitlines() if line.count(":") >= 3]
        return {r[0]: int(r[2]) for r in rows}

    pw, gr = table(passwd), table(group)
    taken = set(pw.values()) | set(gr.values())
    ids: dict[str, int] = {}
    for name in [*users, *groups]:
        known = pw.get(name) if name in users else gr.get(name)
        if known is not None:  # the host has it: keep it
            ids[name] = known
            continue
        n = 61000
        while n in taken:
            n += 1
        taken.add(n)
        ids[name] = gr[name] = n
        group += f"{name}:x:{n}:\n"
        if name in users:
            passwd += f"{name}:x:{n}:{n}::/nonexistent:/usr/sbin/nologin\n"
            pw[name] = n
    ns.write_etc("passwd", passwd)
    ns.write_etc("group", group)
    return ids


class MailNet:
    def __init__(self, nss: dict[str, Netns], work: Path) -> None:
        self.snd, self.mx1, self.mx2 = nss["snd"], nss["mx1"], nss["mx2"]
        self.work = work
        self.procs: list[Proc] = []
        self.fws: list[Forwarder] = []
        self.boxes = {"mx1": work / "mx1-maildir", "mx2": work / "mx2-maildir"}
        self.n = 0

    def wire(self) -> None:
        a, b, c, d = (unique(p) for p in ("e2a", "e2b", "e2c", "e2d"))
        veth(a, b, self.snd.name, f"{SND1}/24", self.mx1.name, f"{MX1}/24")
        veth(c, d, self.snd.name, f"{SND2}/24", self.mx2.name, f"{MX2}/24")
        host = socket.gethostname()
        self.snd.write_etc("hosts", f"127.0.0.1 localhost\n{SND1} sender.{DOMAIN} {host}\n")
        self.snd.write_etc("resolv.conf", "nameserver 127.0.0.1\noptions timeout:1\n")
        for ns, addr in ((self.mx1, MX1), (self.mx2, MX2)):
            ns.write_etc("hosts", f"127.0.0.1 localhost\n{addr} {ns.name}.{DOMAIN} {host}\n")

    def start(self, ns: Netns, cmd: list[str], name: str,
              env: dict[str, str] | None = None) -> Proc:
        p = Proc([*ns.exec(), *cmd], self.work / f"{name}.log", env)
        self.procs.append(p)  # stopped by stop_all even when the test fails
        return p

    def dns(self) -> None:
        dnsmasq = need_tool("dnsmasq")
        self.start(self.snd, [
            dnsmasq, "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--user=root", "--group=root", "--listen-address=127.0.0.1", "--bind-interfaces",
            "--port=53", f"--pid-file={self.work}/dnsmasq.pid", f"--local=/{DOMAIN}/",
            "--local=/#/",  # NXDOMAIN, not REFUSED (glibc: TRY_AGAIN), for other names
            f"--mx-host={DOMAIN},mx1.{DOMAIN},5", f"--mx-host={DOMAIN},mx2.{DOMAIN},10",
            f"--host-record=mx1.{DOMAIN},{MX1}", f"--host-record=mx2.{DOMAIN},{MX2}",
            f"--host-record=sender.{DOMAIN},{SND1}"], "dnsmasq")
        lookup = [*self.snd.exec(), sys.executable, "-c",
                  f"import socket;print(socket.gethostbyname('mx1.{DOMAIN}'))"]
        r = subprocess.run(lookup, capture_output=True, text=True, timeout=10)
        deadline = time.monotonic() + 10
        while MX1 not in r.stdout and time.monotonic() < deadline:
            r = subprocess.run(lookup, capture_output=True, text=True, timeout=10)
        assert MX1 in r.stdout, r.stdout + r.stderr

    def backend(self, ns: Netns, name: str) -> Proc:
        box = self.boxes[name]
        p = self.start(ns, [sys.executable, "-m", "aiosmtpd", "-n", "-l", "127.0.0.1:8025",
                            "-c", "aiosmtpd.handlers.Mailbox", str(box)], f"{name}-backend")
        wait_until(lambda: port_state(ns, "127.0.0.1", 8025) == "open", 15,
                   f"{name} backend listening")
        return p

    def hung_backend(self, ns: Netns) -> Proc:
        p = self.start(ns, [sys.executable, "-c", HUNG], "hung")
        wait_until(lambda: port_state(ns, "127.0.0.1", 8025) == "open", 15, "hung backend")
        return p

    def forwarder(self, ns: Netns, interval: float = 0.5,
                  greeting_timeout: float = 5) -> Forwarder:
        """A forwarder from a config file with the given probe interval and a fixed
        greeting timeout (the Sendmail test's set-up)."""
        cfg = f"""
[[listener]]
name = "smtp"
address = "0.0.0.0"
port = 25
mode = "smtp"
backend = "127.0.0.1:8025"
greeting_timeout = {greeting_timeout}
[listener.probe]
kind = "smtp"
interval = {interval}
timeout = 1.0
"""
        fw = Forwarder(cfg, prefix=ns.exec())
        self.fws.append(fw)  # stopped by stop_all even when the test fails
        fw.start()
        return fw

    def one_liner(self, ns: Netns, address: str) -> Forwarder:
        """The README's one-liner with its defaults (no tuned timeouts), plus the admin
        listener; JSON logs at debug, as every Forwarder."""
        fw = Forwarder(args=["--listen", f"{address}:25", "--backend", "127.0.0.1:8025",
                             "--probe", "smtp", "--admin", ADMIN], prefix=ns.exec())
        self.fws.append(fw)
        fw.start()
        return fw

    def status(self, ns: Netns) -> dict[str, Any]:
        """`forwarder status --json` of the forwarder in `ns`, through its admin listener."""
        r = subprocess.run([*ns.exec(), *forwarder_cmd(), "status", "--admin", ADMIN,
                            "--json"], capture_output=True, text=True, timeout=15)
        assert r.returncode == 0, r.stdout + r.stderr
        data: dict[str, Any] = json.loads(r.stdout)
        return data

    def xinetd(self, ns: Netns) -> Proc:
        xinetd = need_tool("xinetd")
        conf = self.work / "xinetd.conf"
        conf.write_text("service smtp\n{\n disable = no\n socket_type = stream\n"
                        " protocol = tcp\n user = nobody\n wait = no\n"
                        " redirect = 127.0.0.1 8025\n flags = REUSE\n"
                        f" log_type = FILE {self.work}/xinetd-service.log\n}}\n")
        p = self.start(ns, [xinetd, "-dontfork", "-f", str(conf), "-pidfile",
                            str(self.work / "xinetd.pid")], "xinetd")
        wait_until(lambda: port_state(self.snd, MX1, 25) == "open", 15, "xinetd on mx1")
        return p

    def message(self, tag: str = "e2e") -> Message:
        self.n += 1
        return Message(self.n, tag)

    def where(self, msg: Message) -> str:
        """The MX hosts whose Maildir holds the message, comma-separated."""
        found = []
        for name, box in self.boxes.items():
            d = box / "new"
            if d.exists() and any(msg.message_id.encode() in f.read_bytes()
                                  for f in d.iterdir()):
                found.append(name)
        return ",".join(found) or "nowhere"

    def stop_all(self) -> None:
        for fw in self.fws:
            fw.stop()
        self.fws.clear()
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()


@contextlib.contextmanager
def mailnet() -> Iterator[MailNet]:
    """The three namespaces wired, dnsmasq answering; nothing else started yet."""
    need_root()
    need_tool("ip")
    need_tool("dnsmasq")
    work = Path(tempfile.mkdtemp(prefix="fwe2e-"))
    os.chmod(work, 0o755)
    names = {k: unique(k) for k in ("snd", "mx1", "mx2")}
    try:
        with namespaces(*names.values()) as made:
            net = MailNet({k: made[v] for k, v in names.items()}, work)
            try:
                net.wire()
                net.dns()
                yield net
            finally:
                net.stop_all()
    finally:
        shutil.rmtree(work, ignore_errors=True)
