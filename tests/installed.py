"""The project installed where another user can read it, for tests that run the forwarder as
that user (setpriv --reuid=nobody ...).

The checkout's own venv may live under a 0700 directory (root's home, `mktemp -d`): then
`nobody` cannot open `.venv/bin/forwarder`, nor the package behind the editable install.
`install()` builds a throw-away venv in a world-readable temporary directory:

- its interpreter is one the user runs as it is: the venv's base interpreter when, run as
  that user, it reports the same version and standard library as for us, else the
  system's python of the same major.minor (compiled dependencies are per minor version);
- the `forwarder` package is copied from the checkout, its runtime dependencies (the
  closure of its `Requires-Dist` without extras) file by file from the venv that runs the
  tests, as their RECORDs list them (byte-compiled files and their mtimes too, so the
  copies start as fast as the originals);
- `bin/forwarder` is the console script pip would write for the entry point.

Nothing is downloaded.  The directory is removed when the context ends, also on failure.
The venv's path contains the checkout's path, so conftest's leak check (which recognises
this checkout's forwarders by that path in their command line) also covers these.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

from .helpers import ROOT

PROJECT = "forwarder"


@dataclass(frozen=True)
class Installed:
    venv: Path
    python: Path
    user: str

    @property
    def forwarder(self) -> list[str]:
        """The command that runs the installed forwarder (like `forwarder_cmd()`)."""
        return [str(self.venv / "bin" / "forwarder")]


def as_user(user: str) -> list[str]:
    """The command prefix that runs a command as `user` (and its group; root only)."""
    pw = pwd.getpwnam(user)
    return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups"]


def _as_user(user: str, cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run cmd as `user`, outside any directory of the checkout."""
    return subprocess.run([*as_user(user), *cmd], capture_output=True, text=True,
                          timeout=timeout, cwd="/")


_PROBE = "import os, sys; print(sys.version, os.__file__)"


def _interpreter(user: str) -> Path:
    """A python of our major.minor that `user` runs with the same version and stdlib."""
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    base = Path(getattr(sys, "_base_executable", sys.executable))
    candidates = [base, *(Path(p) / f"python{ver}" for p in ("/usr/local/bin", "/usr/bin"))]
    tried = []
    for cand in dict.fromkeys(c for c in candidates if c.is_file()):
        if os.geteuid() != 0:
            return cand  # cannot check as another user; tests that run as one need root
        mine = subprocess.run([str(cand), "-I", "-c", _PROBE], capture_output=True, text=True,
                              timeout=30)
        theirs = _as_user(user, [str(cand), "-I", "-c", _PROBE])
        if mine.returncode == 0 and theirs.returncode == 0 and mine.stdout == theirs.stdout:
            return cand
        tried.append(f"{cand}: as root {mine.stdout.strip() or mine.stderr.strip()!r}, "
                     f"as {user} {theirs.stdout.strip() or theirs.stderr.strip()!r}")
    raise RuntimeError(f"no python {ver} that {user} can run as we do:\n" + "\n".join(tried))


def _runtime_closure() -> list[md.Distribution]:
    """The distributions `forwarder` needs at run time (no extras), transitively."""
    seen: dict[str, md.Distribution] = {}
    todo = list(md.distribution(PROJECT).requires or [])
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = req.name.lower().replace("_", "-")
        if name in seen:
            continue
        dist = md.distribution(req.name)
        seen[name] = dist
        todo += dist.requires or []
    return list(seen.values())


def _copy_dist(dist: md.Distribution, site: Path) -> None:
    for f in dist.files or []:
        if f.parts and f.parts[0] == "..":
            continue  # scripts in bin/: not needed, and they name the old venv
        src = Path(str(dist.locate_file(f)))
        if not src.is_file():
            continue
        dst = site / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


_SCRIPT = """\
#!{python}
# -*- coding: utf-8 -*-
import re
import sys
from {module} import {attr}
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit({attr}())
"""


def _readable(top: Path) -> None:
    for d, _dirs, files in os.walk(top):
        os.chmod(d, 0o755)
        for f in files:
            p = os.path.join(d, f)
            if not os.path.islink(p):
                os.chmod(p, 0o755 if os.access(p, os.X_OK) else 0o644)


def _open_to_all(d: Path) -> bool:
    """Every directory from / down to d can be searched by anyone."""
    return all(os.stat(p).st_mode & 0o001 for p in [d, *d.parents])


def _tmp() -> Path:
    for d in (tempfile.gettempdir(), "/tmp", "/var/tmp"):
        p = Path(d).resolve()
        if p.is_dir() and _open_to_all(p):
            return p
    raise RuntimeError("no temporary directory that every user can reach")


@contextlib.contextmanager
def install(user: str = "nobody") -> Iterator[Installed]:
    base = Path(tempfile.mkdtemp(prefix="fwinstall-", dir=_tmp()))
    try:
        python = _interpreter(user)
        venv = base / str(ROOT).lstrip("/") / "venv"
        venv.parent.mkdir(parents=True)
        subprocess.run([str(python), "-m", "venv", "--without-pip", str(venv)], check=True,
                       capture_output=True, timeout=120)
        (site,) = (venv / "lib").glob("python*/site-packages")
        for dist in _runtime_closure():
            _copy_dist(dist, site)
        shutil.copytree(ROOT / PROJECT, site / PROJECT,
                        ignore=shutil.ignore_patterns("__pycache__"))
        (ep,) = (e for e in md.distribution(PROJECT).entry_points
                 if e.group == "console_scripts" and e.name == PROJECT)
        script = venv / "bin" / PROJECT
        script.write_text(_SCRIPT.format(python=venv / "bin" / "python", module=ep.module,
                                         attr=ep.attr))
        script.chmod(0o755)
        subprocess.run([str(venv / "bin" / "python"), "-m", "compileall", "-q", str(site)],
                       check=True, capture_output=True, timeout=300)
        _readable(base)
        inst = Installed(venv=venv, python=python, user=user)
        if os.geteuid() == 0:  # prove it: the user runs it, from outside the checkout
            r = _as_user(user, [*inst.forwarder, "--version"])
            assert r.returncode == 0 and "forwarder" in r.stdout, (r.stdout, r.stderr)
        yield inst
    finally:
        shutil.rmtree(base, ignore_errors=True)
