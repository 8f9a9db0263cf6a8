"""Debian packages unpacked into private roots, for tools that cannot be installed here.

Postfix and Exim conflict with sendmail-bin as Debian packages (each provides
mail-transport-agent), not as files: `apt-get download` fetches the .deb into a cache
folder, `dpkg -x` unpacks it into a root of its own, and the tools run from there with
LD_LIBRARY_PATH pointing into that root (Debian builds Postfix with a RUNPATH of
/usr/lib/postfix).  Shared libraries the package needs from elsewhere (libidn12 for Exim)
are installed as root with `apt-get install`, only those not installed yet: none of the
machine's packages is changed.  Used by tests/perf/bench.py (Postfix's smtp-source and
smtp-sink) and tests/e2e (Postfix and Exim as senders).

Every function returns a reason string instead of raising when a tool cannot be had, so a
benchmark can skip its row and a test can skip (or, under CI, fail) with that reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

APT_TIMEOUT = 300


def _apt_env() -> dict[str, str]:
    return {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def download(package: str, cache: Path) -> Path | str:
    """The package's .deb in `cache`, fetched once with `apt-get download` (the candidate
    version); a reason when it cannot be had."""
    found = sorted(cache.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        return f"apt-get/dpkg missing: cannot fetch {package}"
    cache.mkdir(parents=True, exist_ok=True)
    part = cache / f".part-{os.getpid()}"  # a download cut short never looks complete
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir()
    try:
        r = subprocess.run(["apt-get", "download", package], cwd=part, capture_output=True,
                           text=True, timeout=APT_TIMEOUT)
        if r.returncode != 0 and os.geteuid() == 0:  # stale package lists
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True,
                           timeout=APT_TIMEOUT)
            r = subprocess.run(["apt-get", "download", package], cwd=part,
                               capture_output=True, text=True, timeout=APT_TIMEOUT)
        debs = sorted(part.glob(f"{package}_*.deb"))
        if not debs:
            return f"apt-get download {package} failed: {r.stderr.strip()[-200:]}"
        return debs[-1].replace(cache / debs[-1].name)
    except (OSError, subprocess.SubprocessError) as e:
        return f"cannot fetch {package}: {e}"
    finally:
        shutil.rmtree(part, ignore_errors=True)


def library_path(root: Path, lib_dirs: Sequence[str]) -> dict[str, str]:
    """The environment for running a tool from `root`: LD_LIBRARY_PATH = its lib_dirs."""
    env = dict(os.environ)
    if lib_dirs:
        env["LD_LIBRARY_PATH"] = ":".join(str(root / d) for d in lib_dirs)
    return env


def missing_libraries(exes: Sequence[Path], env: Mapping[str, str]) -> list[str] | str:
    """Shared objects that `ldd` cannot find for any of exes; a reason when an executable
    itself is missing."""
    missing: list[str] = []
    for exe in exes:
        if not exe.exists():
            return f"{exe} missing"
        r = subprocess.run(["ldd", str(exe)], capture_output=True, text=True, env=dict(env),
                           timeout=30)
        missing += [line.split()[0] for line in r.stdout.splitlines() if "not found" in line]
    return sorted(set(missing))


def _installed(package: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", package], capture_output=True,
                       text=True, timeout=30)
    return r.returncode == 0 and r.stdout.endswith(" installed")


def install_libraries(debs: Sequence[Path]) -> str | None:
    """As root: apt-get install the lib* packages the debs depend on that are not installed
    yet (never an upgrade of one that is).  None when done, else why not."""
    if os.geteuid() != 0:
        return "not root: cannot install the libraries it needs"
    wanted: list[str] = []
    for deb in debs:
        dep = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True,
                             text=True, timeout=30).stdout
        for alt in dep.split(","):
            name = alt.split("|")[0].split("(")[0].strip()
            if name.startswith("lib") and name not in wanted and not _installed(name):
                wanted.append(name)
    if not wanted:
        return None
    r = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                        *wanted], capture_output=True, text=True, timeout=600,
                       env=_apt_env())
    if r.returncode != 0:
        return f"apt-get install {' '.join(wanted)} failed: {r.stderr.strip()[-200:]}"
    return None


def private_root(packages: Sequence[str], cache: Path, root: Path, exes: Sequence[str],
                 lib_dirs: Sequence[str] = ()) -> Path | str:
    """`root` holding the files of every package (dpkg -x), made once, with each of `exes`
    (paths inside the root) present and its shared libraries found (with lib_dirs inside
    the root on LD_LIBRARY_PATH); a reason string when that cannot be had."""
    env = library_path(root, lib_dirs)
    paths = [root / e for e in exes]
    if missing_libraries(paths, env) == []:
        return root
    debs: list[Path] = []
    for p in packages:
        got = download(p, cache)
        if isinstance(got, str):
            return got
        debs.append(got)
    tmp = root.with_name(f"{root.name}.part-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for deb in debs:
            subprocess.run(["dpkg", "-x", str(deb), str(tmp)], check=True, capture_output=True,
                           timeout=120)
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)  # a root is complete or absent
    except (OSError, subprocess.SubprocessError) as e:
        return f"cannot unpack {', '.join(packages)}: {e}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    missing = missing_libraries(paths, env)
    if isinstance(missing, str):
        return f"{', '.join(packages)}: {missing}"
    if missing:
        why = install_libraries(debs)
        missing = missing_libraries(paths, env)
        if missing:
            return (f"{', '.join(packages)} cannot run: {missing} not found"
                    f"{f' ({why})' if why else ''}")
    return root
