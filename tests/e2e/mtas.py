"""Real MTAs as senders, one driver each, all with the same interface:

    mta = Postfix(greeting_timeout=30)
    mta.setup(work, ns)        # its config written under work, its daemons started in ns
    mta.send(msg)  -> Sent     # one message by MX for test.example, delivered at once
    mta.stop()                 # every process it started, by pid

`Sent` holds the seconds until the MTA was done with the message (delivered, or put back
in its queue for a later retry), how many messages it left queued, and a transcript.  The
queue (and any per-host retry state the MTA keeps on disk) is emptied after each message,
so every row starts as a fresh sender would.

- Sendmail 8.17, the Debian package the project installs (sendmail-bin): `sendmail -C cf
  -odi`, a cf built with m4 (confTO_INITIAL = the greeting timeout).
- Postfix 3.7 and Exim 4.96 conflict with sendmail-bin as packages, so they are never
  installed: their .debs are fetched once into tests/e2e/.build/debs and unpacked into
  private roots (tests/debs.py), and run from there.  Their compiled-in accounts (postfix,
  postdrop; Debian-exim) exist only inside the sender's namespace (mailnet.add_users).
  - Postfix: `master -c DIR -d` as root (master insists on it; its daemons run as the
    mail_owner, postfix) with a main.cf naming every directory in the private root and
    the test's own queue_directory / data_directory, queue directories made as Postfix's
    postfix-files has them, and a master.cf of the test's without chroot.  The root's
    libraries (its RUNPATH is /usr/lib/postfix) reach the daemons through
    import_environment (master passes nothing else on) and postdrop through
    export_environment; maillog_file (postlogd; maillog_file_prefixes allows the test's
    directory) is the log the test reads.  A message goes in through the root's
    `sendmail` (postdrop, pickup: delivered at once); it is done when the log shows its
    status (sent, deferred, bounced).  smtp_helo_timeout = the greeting timeout; no
    on-demand connection cache (a cached session to mx2 would skip mx1 next row).
  - Exim: `exim4 -C cfg -odf` (receive, then deliver in the foreground) as root; cfg sets
    spool_directory, log_file_path and exim_path into the test's directories and the
    root, a dnslookup router and an smtp transport whose command_timeout (also the limit
    for the banner) = the greeting timeout.  Exim receives as root, then re-executes
    itself as Debian-exim to deliver; a -C file that is not in the compiled-in
    TRUSTED_CONFIG_LIST (/etc/exim4/trusted_configs, which the test does not create on
    the host) keeps that process from regaining root, so each message logs "exim user
    lost privilege for using -C option" (paniclog).  It changes nothing for a remote
    delivery: Exim's smtp transport runs as the Exim user anyway.
"""

from __future__ import annotations

import abc
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from .. import debs
from ..conftest import need_tool
from ..netns import Netns
from .mailnet import DOMAIN, MailNet, Message, Proc, Result, add_users

BUILD = Path(__file__).resolve().parent / ".build"  # tests/e2e/.gitignore keeps it out of git
CACHE = BUILD / "debs"
CONNECT_TIMEOUT = 5  # seconds; no row has a black-holed SYN, so it is never reached


def need_root_of(got: Path | str) -> Path:
    """A private root, or skip with the reason (fail under CI, as conftest.need_tool)."""
    if isinstance(got, str):
        if os.environ.get("CI"):
            pytest.fail(f"{got}: CI must be able to fetch and run it")
        pytest.skip(got)
    return got


@dataclass(frozen=True)
class Sent:
    seconds: float
    queued: int
    transcript: str


class MTA(abc.ABC):
    """One sending MTA in the sender's namespace."""

    name: ClassVar[str]

    def __init__(self, greeting_timeout: float) -> None:
        self.greeting_timeout = greeting_timeout
        self.procs: list[Proc] = []
        self.version = "?"

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"

    @abc.abstractmethod
    def setup(self, work: Path, ns: Netns) -> None:
        """Write the config under work (a directory of its own), start what must run."""

    @abc.abstractmethod
    def send(self, msg: Message) -> Sent:
        """Submit msg for delivery by MX now; return when the MTA is done with it."""

    def start(self, ns: Netns, cmd: list[str], log: Path,
              env: dict[str, str] | None = None, own_group: bool = False) -> Proc:
        p = Proc([*ns.exec(), *cmd], log, env, own_group)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()


def _run(ns: Netns, cmd: list[str], msg: Message | None = None,
         env: dict[str, str] | None = None, timeout: float = 120
         ) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.monotonic()
    r = subprocess.run([*ns.exec(), *cmd], input=msg.text if msg else "",
                       capture_output=True, text=True, timeout=timeout, env=env)
    return time.monotonic() - t0, r


# ---------------------------------------------------------------------------- Sendmail

SENDMAIL_MC = """\
divert(0)dnl
include(`/usr/share/sendmail/cf/m4/cf.m4')dnl
VERSIONID(`forwarder e2e')dnl
OSTYPE(`linux')dnl
define(`confDOMAIN_NAME', `sender.test.example')dnl
define(`confDONT_PROBE_INTERFACES', `True')dnl
define(`confTO_INITIAL', `{greeting}s')dnl
define(`confTO_CONNECT', `{connect}s')dnl
define(`confTO_ICONNECT', `{connect}s')dnl
define(`ALIAS_FILE', `{dir}/aliases')dnl
define(`confPID_FILE', `{dir}/sendmail.pid')dnl
define(`STATUS_FILE', `{dir}/statistics')dnl
define(`QUEUE_DIR', `{dir}/queue')dnl
FEATURE(`nocanonify')dnl
MAILER(`local')dnl
MAILER(`smtp')dnl
"""


class Sendmail(MTA):
    name = "Sendmail"

    def setup(self, work: Path, ns: Netns) -> None:
        self.ns = ns
        self.exe = need_tool("sendmail")
        need_tool("m4")
        self.queue = work / "queue"
        self.queue.mkdir(parents=True)
        os.chmod(self.queue, 0o700)
        (work / "aliases").write_text("")
        (work / "statistics").write_text("")
        mc = SENDMAIL_MC.format(greeting=self.greeting_timeout, connect=CONNECT_TIMEOUT,
                                dir=work)
        self.cf = work / "sendmail.cf"
        self.cf.write_text(subprocess.run(["m4"], input=mc, capture_output=True, text=True,
                                          timeout=30, check=True).stdout)
        _, r = _run(ns, [self.exe, "-C", str(self.cf), "-d0.1", "-bt"], timeout=30)
        m = re.search(r"Version (\S+)", r.stdout)
        self.version = m.group(1) if m else "?"

    def send(self, msg: Message) -> Sent:
        took, r = _run(self.ns, [self.exe, "-C", str(self.cf), "-odi", "-v",
                                 "-f", msg.sender, msg.rcpt], msg)
        queued = len(list(self.queue.glob("qf*")))
        for f in self.queue.iterdir():  # each row starts with an empty queue
            f.unlink()
        return Sent(took, queued, r.stdout + r.stderr)


# ----------------------------------------------------------------------------- Postfix

PF_LIBS = ("usr/lib/postfix",)
PF_DAEMONS = ("master", "pickup", "cleanup", "qmgr", "trivial-rewrite", "smtp", "bounce",
              "error", "postlogd", "anvil", "scache", "showq", "flush", "verify", "proxymap",
              "discard")
PF_EXES = (*(f"usr/lib/postfix/sbin/{d}" for d in PF_DAEMONS),
           "usr/sbin/sendmail", "usr/sbin/postdrop", "usr/sbin/postsuper",
           "usr/sbin/postconf")
PF_QUEUES = ("active", "bounce", "corrupt", "defer", "deferred", "flush", "hold", "incoming",
             "private", "saved", "trace")  # mail_owner, 0700 (as postfix-files has them)
PF_WAITING = ("maildrop", "incoming", "active", "deferred", "hold")  # where mail waits

PF_MASTER = """\
# service type  private unpriv  chroot  wakeup  maxproc command
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix(MTA):
    name = "Postfix"

    def setup(self, work: Path, ns: Netns) -> None:
        self.ns = ns
        root = need_root_of(debs.private_root(["postfix"], CACHE, BUILD / "postfix", PF_EXES,
                                              PF_LIBS))
        self.root = root
        self.env = debs.library_path(root, PF_LIBS)
        ids = add_users(ns, ["postfix"], ["postdrop"])
        owner, sgid = ids["postfix"], ids["postdrop"]
        self.etc, self.queue, data = work / "etc", work / "queue", work / "data"
        for d in (self.etc, self.queue, data):
            d.mkdir(parents=True)
        for q in PF_QUEUES:
            (self.queue / q).mkdir(mode=0o700)
            os.chown(self.queue / q, owner, owner)
        for q, mode in (("maildrop", 0o730), ("public", 0o710)):
            (self.queue / q).mkdir()
            os.chown(self.queue / q, owner, sgid)
            os.chmod(self.queue / q, mode)
        (self.queue / "pid").mkdir()
        os.chown(data, owner, owner)
        os.chmod(data, 0o700)
        self.maillog = work / "maillog"
        lib = self.env["LD_LIBRARY_PATH"]
        (self.etc / "main.cf").write_text(f"""\
compatibility_level = 3.6
# the private root (dpkg -x of Debian's postfix), and this test's own directories
config_directory = {self.etc}
queue_directory = {self.queue}
data_directory = {data}
daemon_directory = {root}/usr/lib/postfix/sbin
command_directory = {root}/usr/sbin
shlib_directory = {root}/usr/lib/postfix
meta_directory = {root}/etc/postfix
sendmail_path = {root}/usr/sbin/sendmail
newaliases_path = {root}/usr/bin/newaliases
mailq_path = {root}/usr/bin/mailq
mail_owner = postfix
setgid_group = postdrop
# RUNPATH is /usr/lib/postfix: the daemons get the root's libraries from master, which
# passes only import_environment on; sendmail passes only export_environment to postdrop
import_environment = MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C LD_LIBRARY_PATH={lib}
export_environment = TZ MAIL_CONFIG LANG LD_LIBRARY_PATH
maillog_file = {self.maillog}
maillog_file_prefixes = {work}
# a sender for test.example, by MX
myhostname = sender.{DOMAIN}
mydomain = sender.{DOMAIN}
myorigin = sender.{DOMAIN}
mydestination =
local_transport = error:local delivery is off in this test
alias_maps =
alias_database =
inet_interfaces = loopback-only
inet_protocols = ipv4
smtp_tls_security_level = none
smtp_helo_timeout = {self.greeting_timeout:g}s
smtp_connect_timeout = {CONNECT_TIMEOUT}s
# one connection per message: a cached session to mx2 would skip mx1 in the next row
smtp_connection_cache_on_demand = no
""")
        (self.etc / "master.cf").write_text(PF_MASTER)
        r = subprocess.run([str(root / "usr/sbin/postconf"), "-c", str(self.etc), "-h",
                            "mail_version"], capture_output=True, text=True, env=self.env,
                           timeout=30)
        self.version = r.stdout.strip() or "?"
        self.pos, self.cursor = 0, 0
        self.lines: list[str] = []
        # master -d (no detach) skips its setsid(); on SIGTERM it signals its process
        # group to stop its daemons, so it gets a group of its own here
        self.master = self.start(ns, [str(root / "usr/lib/postfix/sbin/master"), "-c",
                                      str(self.etc), "-d"], work / "master.out", self.env,
                                 own_group=True)
        self.wait_log(re.compile(r"postfix/master\[\d+\]: daemon started"), 15,
                      "postfix master started")

    def read_log(self) -> None:
        """Append maillog's new complete lines to self.lines."""
        try:
            with open(self.maillog, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        self.pos += end
        self.lines += data[:end].decode("utf-8", "replace").splitlines()

    def wait_log(self, pattern: re.Pattern[str], timeout: float, what: str) -> re.Match[str]:
        """The first line after the last one matched that matches pattern: maillog polled
        (its writer, postlogd, offers no other event), bounded."""
        deadline = time.monotonic() + timeout
        while True:
            self.read_log()
            for i in range(self.cursor, len(self.lines)):
                m = pattern.search(self.lines[i])
                if m:
                    self.cursor = i + 1
                    return m
            if self.master.p.poll() is not None:
                raise AssertionError(f"postfix master exited ({self.master.p.returncode}) "
                                     f"before {what}:\n" + "\n".join(self.lines[-20:]))
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout}s:\n"
                                     + "\n".join(self.lines[-20:]))
            time.sleep(0.01)

    def send(self, msg: Message) -> Sent:
        self.read_log()  # what earlier messages left is not this one's
        self.cursor = start = len(self.lines)
        t0 = time.monotonic()
        _, r = _run(self.ns, [str(self.root / "usr/sbin/sendmail"), "-C", str(self.etc),
                              "-f", msg.sender, msg.rcpt], msg, self.env)
        assert r.returncode == 0, r.stdout + r.stderr
        mid = re.escape(msg.message_id)
        qid = self.wait_log(re.compile(rf"postfix/cleanup\[\d+\]: (\w+): message-id={mid}"),
                            15, f"message {msg.message_id} picked up").group(1)
        # the message's final status: each host tried in turn is logged before it
        status = self.wait_log(re.compile(rf"\b{qid}: to=<[^>]*>, .*status=(\w+)"),
                               self.greeting_timeout * 3 + 30,
                               f"{qid} delivered or deferred").group(1)
        took = time.monotonic() - t0
        if status != "deferred":
            self.wait_log(re.compile(rf"\b{qid}: removed"), 10, f"{qid} removed")
        queued = sum(1 for q in PF_WAITING for f in (self.queue / q).rglob("*") if f.is_file())
        if queued:  # each row starts with an empty queue
            subprocess.run([*self.ns.exec(), str(self.root / "usr/sbin/postsuper"), "-c",
                            str(self.etc), "-d", "ALL"], capture_output=True, env=self.env,
                           timeout=30)
        transcript = [line for line in self.lines[start:]
                      if qid in line or "postfix/smtp[" in line]
        return Sent(took, queued, "\n".join(transcript))


# -------------------------------------------------------------------------------- Exim

EXIM_EXE = "usr/sbin/exim4"

EXIM_CONF = """\
# this test's directories and the private root (dpkg -x of Debian's exim4-daemon-light);
# the compiled-in exim_user (Debian-exim) exists in the sender's namespace only
spool_directory = {spool}
log_file_path = {spool}/log/%slog
exim_path = {exim}
keep_environment =
primary_hostname = sender.{domain}
qualify_domain = sender.{domain}
disable_ipv6 = true

begin routers

by_mx:
  driver = dnslookup
  domains = {domain}
  transport = remote_smtp
  no_more

begin transports

remote_smtp:
  driver = smtp
  # also the limit for the server's banner (there is no separate greeting timeout)
  command_timeout = {greeting}s
  connect_timeout = {connect}s

begin retry

# Exim's default rule
*   *   F,2h,15m; G,16h,1h,1.5; F,4d,6h
"""


class Exim(MTA):
    name = "Exim"

    def setup(self, work: Path, ns: Netns) -> None:
        self.ns = ns
        root = need_root_of(debs.private_root(["exim4-daemon-light"], CACHE,
                                              BUILD / "exim4", [EXIM_EXE]))
        self.exe = root / EXIM_EXE
        uid = add_users(ns, ["Debian-exim"])["Debian-exim"]
        self.spool = work / "spool"
        self.spool.mkdir(parents=True)
        os.chown(self.spool, uid, uid)
        self.cfg = work / "exim.conf"  # owned by root, not writable by others: -C takes it
        self.cfg.write_text(EXIM_CONF.format(spool=self.spool, exim=self.exe, domain=DOMAIN,
                                             greeting=f"{self.greeting_timeout:g}",
                                             connect=CONNECT_TIMEOUT))
        _, r = _run(ns, [str(self.exe), "-C", str(self.cfg), "-bV"], timeout=30)
        m = re.search(r"Exim version (\S+)", r.stdout)
        assert m, r.stdout + r.stderr
        self.version = m.group(1)

    def send(self, msg: Message) -> Sent:
        took, r = _run(self.ns, [str(self.exe), "-C", str(self.cfg), "-odf", "-v",
                                 "-f", msg.sender, msg.rcpt], msg)
        queued = len(list((self.spool / "input").rglob("*-H")))
        # each row starts with an empty queue and no retry hints (Exim would skip a host
        # whose retry time has not come, without trying it)
        for sub in ("input", "msglog", "db"):
            shutil.rmtree(self.spool / sub, ignore_errors=True)
        return Sent(took, queued, r.stdout + r.stderr)


MTAS: tuple[type[MTA], ...] = (Sendmail, Postfix, Exim)


def deliver(net: MailNet, mta: MTA, tag: str = "e2e") -> Result:
    """One new message through mta; where it arrived, read from the MX hosts' Maildirs."""
    msg = net.message(tag)
    sent = mta.send(msg)
    return Result(sent.seconds, net.where(msg), sent.queued, sent.transcript)
