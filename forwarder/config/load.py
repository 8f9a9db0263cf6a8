"""The load step (uvicorn's Config.load): what turns a checked Config into one the run time
can use without ever raising a config error.

Everything that needs the network or the host happens here, once: backend host names and
host names in access lists are resolved (getaddrinfo blocks, so at a SIGHUP reload the
service runs this in a thread, off the event loop), and a static backend that is one of our
own listening addresses is rejected (a forwarder relaying to itself loops until it runs out
of file descriptors).  Files are read only when they are regular files of bounded size: a
config path pointing at /dev/zero or a FIFO must be an error, not a hang.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from dataclasses import replace

from ..net.sockets import local_addresses
from .checks import check_error, is_own_address
from .model import Config, ConfigError, Network, printable

MAX_FILE_SIZE = 1 << 20


def read_file(path: str, *, at: tuple[str, int] | None = None) -> bytes:
    """A regular file's bytes, at most MAX_FILE_SIZE (a FIFO or /dev/zero must be an
    error, not a hang).  A problem is reported against the file itself, or, when it was
    named by an include line (`at`: file and line), against that line, naming the path."""
    file, line = at if at else (path, None)
    what = f"{printable(path)}: " if at else ""  # else the file is already the error's file

    def error(message: str) -> ConfigError:
        return ConfigError(what + message, file=file, line=line)

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        raise error(f"cannot read: {e.strerror}") from None
    except ValueError:  # a NUL in a path (from an include line): no such file can exist
        raise error("cannot read: a path cannot hold a NUL character") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error("not a regular file")
        if st.st_size > MAX_FILE_SIZE:
            raise error(f"larger than {MAX_FILE_SIZE} bytes")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_FILE_SIZE + 1)
    except OSError as e:
        raise error(f"cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_SIZE:  # grew since the fstat
        raise error(f"larger than {MAX_FILE_SIZE} bytes")
    return data


def networks(cfg: Config, index: int, key: str, entries: tuple[str, ...]) -> tuple[Network, ...]:
    """Addresses, CIDR networks and host names (resolved now) to networks."""
    nets: list[Network] = []
    for i, e in enumerate(entries):
        try:
            nets.append(ipaddress.ip_network(e, strict=False))
            continue
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(e, None, type=socket.SOCK_STREAM)
        except socket.gaierror as ex:
            raise check_error(cfg, index, f"{key}.{i}",
                              f"cannot resolve host name {e!r}: {ex.strerror}") from None
        for info in infos:
            nets.append(ipaddress.ip_network(str(info[4][0]).split("%", 1)[0]))
    return tuple(nets)


def resolve(cfg: Config) -> Config:
    """Resolve names and apply the checks that need them (see the module docstring)."""
    local = local_addresses()
    listens = [ep for lc in cfg.listeners for ep in lc.endpoints]
    out = []
    for i, lc in enumerate(cfg.listeners):
        backends = []
        for b in lc.backends:
            key = b.key or "backend"
            try:
                infos = socket.getaddrinfo(b.endpoint.host, b.endpoint.port,
                                           type=socket.SOCK_STREAM)
            except socket.gaierror as e:
                raise check_error(cfg, i if not b.key else None, key,
                                  f"cannot resolve {b.endpoint.host!r}: {e.strerror}") from None
            sa = (infos[0][0], infos[0][4])
            if is_own_address(sa[1], listens, local):
                raise check_error(cfg, i if not b.key else None, key,
                                  f"{b.endpoint} is this forwarder's own listening address: "
                                  "relaying to ourselves would loop")
            backends.append(replace(b, sockaddr=sa))
        a = lc.access
        access = a
        if a.only_from or a.no_access:
            access = replace(a, only_from_nets=networks(cfg, i, "access.only_from", a.only_from),
                             no_access_nets=networks(cfg, i, "access.no_access", a.no_access))
        out.append(replace(lc, backends=tuple(backends), access=access))
    return replace(cfg, listeners=tuple(out))
