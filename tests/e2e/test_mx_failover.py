"""The project's point, proven with a real MTA: Sendmail delivering by MX to two MX hosts.

A small mail network in network namespaces (created and removed by the test):

    snd (10.99.1.1, 10.99.2.1)  sendmail, delivering by MX; dnsmasq on 127.0.0.1:53 serving
                                 test.example MX 5 mx1, MX 10 mx2
    mx1 (10.99.1.2)             port 25: the forwarder (or xinetd, for comparison)
                                 in front of 127.0.0.1:8025 (aiosmtpd Maildir, or a hung one)
    mx2 (10.99.2.2)             port 25: the forwarder in front of 127.0.0.1:8025 (aiosmtpd)

Each scenario sends one message with `sendmail -odi` (deliver now, in the foreground) and
records where it arrived, how long sendmail took, and what it left queued.  Sendmail's
greeting timeout is set to GREETING_TIMEOUT seconds (5 minutes by default) so the hung
case stays short.  The table is printed (pytest -s) and written to E2E_TABLE for the README.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import need_root, need_tool
from ..helpers import ROOT, Forwarder, wait_until
from ..netns import Netns, namespaces, unique, veth

GREETING_TIMEOUT = 10
DOMAIN = "test.example"
MX1, MX2, SND1, SND2 = "10.99.1.2", "10.99.2.2", "10.99.1.1", "10.99.2.1"
E2E_TABLE = ROOT / ".pytest_cache" / "e2e-table.md"

MC = """\
divert(0)dnl
include(`/usr/share/sendmail/cf/m4/cf.m4')dnl
VERSIONID(`forwarder e2e')dnl
OSTYPE(`linux')dnl
define(`confDOMAIN_NAME', `sender.test.example')dnl
define(`confDONT_PROBE_INTERFACES', `True')dnl
define(`confTO_INITIAL', `{greeting}s')dnl
define(`confTO_CONNECT', `5s')dnl
define(`confTO_ICONNECT', `5s')dnl
define(`ALIAS_FILE', `{dir}/aliases')dnl
define(`confPID_FILE', `{dir}/sendmail.pid')dnl
define(`STATUS_FILE', `{dir}/statistics')dnl
define(`QUEUE_DIR', `{dir}/queue')dnl
FEATURE(`nocanonify')dnl
MAILER(`local')dnl
MAILER(`smtp')dnl
"""

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


class Proc:
    """A process started inside a namespace, stopped by its pid."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
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


class MailNet:
    def __init__(self, nss: dict[str, Netns], work: Path) -> None:
        self.snd, self.mx1, self.mx2 = nss["snd"], nss["mx1"], nss["mx2"]
        self.work = work
        self.procs: list[Proc] = []
        self.fws: list[Forwarder] = []
        self.boxes = {"mx1": work / "mx1-maildir", "mx2": work / "mx2-maildir"}
        self.cf = work / "sendmail.cf"
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

    def start(self, ns: Netns, cmd: list[str], name: str) -> Proc:
        p = Proc([*ns.exec(), *cmd], self.work / f"{name}.log")
        self.procs.append(p)
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
        r = subprocess.run([*self.snd.exec(), sys.executable, "-c",
                            "import socket;print(socket.gethostbyname('mx1.test.example'))"],
                           capture_output=True, text=True, timeout=10)
        deadline = time.monotonic() + 10
        while MX1 not in r.stdout and time.monotonic() < deadline:
            r = subprocess.run([*self.snd.exec(), sys.executable, "-c",
                                "import socket;print(socket.gethostbyname('mx1.test.example'))"],
                               capture_output=True, text=True, timeout=10)
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

    def sendmail_cf(self) -> None:
        need_tool("m4")
        sm = self.work / "sm"
        (sm / "queue").mkdir(parents=True)
        os.chmod(sm / "queue", 0o700)
        (sm / "aliases").write_text("")
        (sm / "statistics").write_text("")
        mc = MC.format(greeting=GREETING_TIMEOUT, dir=sm)
        cf = subprocess.run(["m4"], input=mc, capture_output=True, text=True, timeout=30,
                            check=True).stdout
        self.cf.write_text(cf)
        self.queue = sm / "queue"

    def arrived(self, name: str) -> int:
        d = self.boxes[name] / "new"
        return len(list(d.iterdir())) if d.exists() else 0

    def send(self) -> tuple[float, str, int, str]:
        """One message; (seconds, where it arrived, left in queue, sendmail's transcript)."""
        self.n += 1
        before = {k: self.arrived(k) for k in self.boxes}
        msg = (f"From: sender@sender.{DOMAIN}\nTo: user@{DOMAIN}\n"
               f"Subject: e2e {self.n}\n\nmessage {self.n}\n")
        sendmail = need_tool("sendmail")
        t0 = time.monotonic()
        r = subprocess.run([*self.snd.exec(), sendmail, "-C", str(self.cf), "-odi", "-v",
                            "-f", f"sender@sender.{DOMAIN}", f"user@{DOMAIN}"],
                           input=msg, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - t0
        where = [k for k in self.boxes if self.arrived(k) > before[k]]
        queued = len(list(self.queue.glob("qf*")))
        for f in self.queue.iterdir():  # each scenario starts with an empty queue
            f.unlink()
        return took, ",".join(where) or "nowhere (queued)", queued, r.stdout + r.stderr

    def stop_all(self) -> None:
        for fw in self.fws:
            fw.stop()
        self.fws.clear()
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()


@contextlib.contextmanager
def mailnet() -> Iterator[MailNet]:
    need_root()
    need_tool("ip")
    need_tool("sendmail")
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
                net.sendmail_cf()
                yield net
            finally:
                net.stop_all()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_sendmail_fails_over_by_mx_when_the_forwarder_closes_its_gate() -> None:
    rows: list[tuple[str, str, str, float, int]] = []

    def record(front: str, backend: str, result: tuple[float, str, int, str]) -> None:
        took, where, queued, transcript = result
        rows.append((front, backend, where, took, queued))
        print(f"--- {front} / {backend}: {where} in {took:.2f}s, queued {queued}\n"
              f"{transcript[-1500:]}")

    with mailnet() as net:
        be2 = net.backend(net.mx2, "mx2")
        fw2 = net.forwarder(net.mx2)
        fw2.wait_event("gate.open", timeout=15)

        # 1. the primary is healthy: mail lands on mx1
        be1 = net.backend(net.mx1, "mx1")
        fw1 = net.forwarder(net.mx1)
        fw1.wait_event("gate.open", timeout=15)
        r = net.send()
        record("forwarder", "up", r)
        assert r[1] == "mx1" and r[2] == 0, r[3]

        # 2. its backend dies between two probes: the gate is still open when sendmail
        # connects (the probe interval is long); the connection is answered 421 or the
        # gate has already closed on the passive failure; either way, mx2 at once
        fw1.stop()
        fw1 = net.forwarder(net.mx1, interval=60)
        fw1.wait_event("gate.open", timeout=15)
        be1.stop()
        r = net.send()
        record("forwarder", "dies between probes", r)
        assert r[1] == "mx2" and r[2] == 0, r[3]
        assert r[0] < GREETING_TIMEOUT / 2, r[3]
        fw1.stop()

        # 3. backend down: the forwarder refuses on mx1, sendmail goes to mx2 at once
        fw1 = net.forwarder(net.mx1)
        fw1.wait_event("probe.failed", timeout=15)  # it starts closed and stays so
        assert port_state(net.snd, MX1, 25) == "refused"
        r = net.send()
        record("forwarder", "down", r)
        assert r[1] == "mx2" and r[2] == 0, r[3]
        assert r[0] < GREETING_TIMEOUT / 2, r[3]

        # 4. backend hung (accepts, never greets): the smtp probe keeps the gate closed
        hung = net.hung_backend(net.mx1)
        assert port_state(net.snd, MX1, 25) == "refused"
        r = net.send()
        record("forwarder", "hung", r)
        assert r[1] == "mx2" and r[2] == 0, r[3]
        assert r[0] < GREETING_TIMEOUT / 2, r[3]
        fw1.stop()

        # 5. backend hangs while the gate is open (the next probe is a minute away): the
        # greeting watchdog answers 421 after greeting_timeout, sendmail moves on
        hung.stop()
        be1 = net.backend(net.mx1, "mx1")
        fw1 = net.forwarder(net.mx1, interval=60, greeting_timeout=2)
        fw1.wait_event("gate.open", timeout=15)
        be1.stop()
        hung = net.hung_backend(net.mx1)
        r = net.send()
        record("forwarder", "hangs between probes", r)
        assert r[1] == "mx2" and r[2] == 0, r[3]
        assert 2 <= r[0] < GREETING_TIMEOUT - 2, r[3]
        fw1.stop()

        # the same two outages behind xinetd's redirect
        xi = net.xinetd(net.mx1)
        r = net.send()
        record("xinetd", "hung", r)
        assert r[1] == "mx2" and r[2] == 0, r[3]
        assert r[0] >= GREETING_TIMEOUT - 1, r[3]  # waited out the greeting timeout
        hung.stop()
        wait_until(lambda: port_state(net.mx1, "127.0.0.1", 8025) == "refused", 10,
                   "hung backend gone")
        r = net.send()
        record("xinetd", "down", r)
        assert r[1] == "mx2" and r[2] == 0, r[3]
        xi.stop()
        assert fw2.proc is not None and fw2.proc.poll() is None
        fw2.stop()
        be2.stop()

    table = ["| front on mx1 | mx1's backend | mail went to | seconds | left queued |",
             "|---|---|---|---|---|"]
    table += [f"| {f} | {b} | {w} | {t:.1f} | {q} |" for f, b, w, t, q in rows]
    text = "\n".join(table) + "\n"
    print(text)
    E2E_TABLE.parent.mkdir(exist_ok=True)
    E2E_TABLE.write_text(f"Sendmail greeting timeout {GREETING_TIMEOUT} s "
                         f"(default 5 min)\n\n{text}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-s"]))
