"""The OS edges: binding, socket activation, dropping privileges, sd_notify.

Binding happens exactly once, before privileges are dropped; the gate later only toggles
`listen()`/`shutdown(SHUT_RD)` on these sockets, which needs no privilege.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import resource
import socket
import stat

import structlog

from ..config.model import Endpoint, ListenerConfig
from ..net.sockets import unlisten

log = structlog.get_logger("forwarder.system")

SD_LISTEN_FDS_START = 3


class SystemError_(Exception):
    """A start-up failure of the environment (bind, user lookup, privilege drop)."""


def bind(ep: Endpoint, *, reuse_port: bool = False, claim: bool = True) -> socket.socket:
    """Create a bound, non-listening TCP socket (refuses connections until listen()).

    `claim`: see claim(); the admin socket is not a gate and skips it."""
    try:
        infos = socket.getaddrinfo(ep.host, ep.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV)
    except socket.gaierror as e:
        raise SystemError_(f"cannot resolve listen address {ep}: {e.strerror}") from None
    family, stype, proto, _, addr = infos[0]
    sock = socket.socket(family, stype, proto)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # without SO_REUSEADDR first: then no other socket may share the port (see
        # net/sockets.py); a previous instance's TIME_WAIT leftovers need it on
        shared = not claim
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(shared))
        try:
            sock.bind(addr)
        except OSError as e:
            if e.errno != errno.EADDRINUSE or shared:
                raise
            shared = True
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
        if claim and shared:
            unlisten(sock, claim=True)
    except OSError as e:
        sock.close()
        hint = ""
        if e.errno == errno.EACCES:
            hint = " (ports below 1024 need root, CAP_NET_BIND_SERVICE or socket activation)"
        elif e.errno == errno.EADDRINUSE:
            holder = port_holder(ep.port)
            hint = (f" (held by {holder})" if holder else
                    " (another process has it bound; a forwarder whose gate is closed holds "
                    "its port without listening, so `ss -ltnp` may not show it)")
        raise SystemError_(f"cannot bind {ep}: {e.strerror}{hint}") from None
    sock.setblocking(False)
    return sock


def port_holder(port: int) -> str | None:
    """Who listens on `port`, as far as /proc shows it: "pid 123 (xinetd)", or the
    owner's uid when its process is not visible to us, or None."""
    inodes: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) < 10 or parts[3] != "0A":  # 0A: LISTEN
                        continue
                    if int(parts[1].rsplit(":", 1)[1], 16) == port:
                        inodes[parts[9]] = int(parts[7])
        except OSError:
            continue
    if not inodes:
        return None
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            for fd in os.listdir(f"/proc/{d}/fd"):
                target = os.readlink(f"/proc/{d}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    with open(f"/proc/{d}/comm", encoding="utf-8", errors="replace") as c:
                        return f"pid {d} ({c.read().strip()})"
        except OSError:
            continue
    uid = next(iter(inodes.values()))
    try:
        who = pwd.getpwuid(uid).pw_name
    except KeyError:
        who = str(uid)
    return f"a process of user {who}"


def hostname() -> str:
    """The name for the 421 text: the canonical FQDN when the resolver knows one (what
    `hostname -f` prints), else the kernel's host name; "localhost" only when that is
    really the host's name (socket.getfqdn() falls back to it on a bare container)."""
    name = socket.gethostname()
    try:
        canon = socket.getaddrinfo(name, None, flags=socket.AI_CANONNAME)[0][3]
    except (OSError, UnicodeError):
        canon = ""
    for cand in (canon, socket.getfqdn(name)):
        if cand and "." in cand and not cand.lower().startswith("localhost"):
            return cand
    return name or "localhost"


def tune(sock: socket.socket, cfg: ListenerConfig, *, explicit: bool = False) -> None:
    """`nodelay` / `keepalive` from the listener's config.  A backend socket gets only what
    is on (one syscall per connection with the defaults); a listening socket (`explicit`)
    gets both set either way, so a reload can turn one off.  Accepted sockets inherit both
    from their listening socket (Linux), so the client side costs nothing per connection."""
    if cfg.nodelay or explicit:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(cfg.nodelay))
    if cfg.keepalive or explicit:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(cfg.keepalive))


class ActivatedSocket(socket.socket):
    """A socket passed by systemd, with its LISTEN_FDNAMES entry."""

    fd_name: str = ""


def activated_sockets() -> list[socket.socket]:
    """Sockets passed by systemd (LISTEN_FDS/LISTEN_PID), or [] when not activated.

    The variables are removed so children do not inherit them.
    """
    pid = os.environ.get("LISTEN_PID")
    nfds = os.environ.get("LISTEN_FDS")
    if not nfds or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return []
    names = os.environ.get("LISTEN_FDNAMES", "")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    socks: list[socket.socket] = []
    for i, fd in enumerate(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(nfds))):
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise SystemError_(f"LISTEN_FDS: fd {fd} is not a socket")
        s = ActivatedSocket(fileno=fd)
        if s.type != socket.SOCK_STREAM:
            raise SystemError_(f"LISTEN_FDS: fd {fd} is not a stream socket")
        s.setblocking(False)
        s.fd_name = names.split(":")[i] if names else ""
        socks.append(s)
    return socks


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit: a relayed connection costs two fds (six
    while a splice holds its pipes), and the default soft limit (1024) would cap us at a
    few hundred sessions.  Returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def drop_privileges(user: str | None, group: str | None) -> tuple[int, int] | None:
    """Drop to user/group (default nobody) when running as root; verify it cannot come back.

    Returns (uid, gid) after the drop, or None when nothing was dropped (not root).
    """
    if os.geteuid() != 0:
        if user and user != pwd.getpwuid(os.geteuid()).pw_name:
            log.warning("privileges.not_root", wanted_user=user,
                        detail="not started as root; staying as the current user")
        return None
    name = user or "nobody"
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise SystemError_(f"user {name!r} does not exist") from None
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise SystemError_(f"group {group!r} does not exist") from None
    else:
        gid = pw.pw_gid
    if pw.pw_uid == 0:
        log.warning("privileges.kept_root", detail="user is root; not dropping privileges")
        return None
    os.setgroups([])
    os.setgid(gid)
    os.setuid(pw.pw_uid)
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:  # pragma: no cover - would be a kernel/libc bug
        raise SystemError_("privilege drop failed: setuid(0) succeeded afterwards")
    log.info("privileges.dropped", user=name, uid=pw.pw_uid, gid=gid)
    return pw.pw_uid, gid


def sd_notify(message: str) -> bool:
    """Send a message to systemd's notify socket; False when not under systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall(message.encode())
        return True
    except OSError as e:
        log.warning("sd_notify.failed", error=e.strerror)
        return False


def watchdog_interval() -> float | None:
    """Half of WatchdogSec when systemd asks for pings, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
