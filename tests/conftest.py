from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .installed import Installed


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (CI runs as root)")


def need_tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing in CI: `make test` should have installed it")
        pytest.skip(f"{name} not installed (make test installs it as root)")
    return path


@pytest.fixture
def tool() -> Callable[[str], str]:
    return need_tool


# Every process this test session starts inherits this variable; a forwarder carrying it is
# ours.  Another pytest session on the same checkout (a second terminal) has its own value,
# so one session never counts or kills the other's forwarders.
SESSION_VAR = "FORWARDER_TEST_SESSION"
os.environ[SESSION_VAR] = f"{os.getpid()}-{time.time_ns()}"


def _forwarders() -> set[int]:
    """Live (non-zombie) processes running this checkout's forwarder for this session."""
    marker = str(Path(__file__).resolve().parent.parent).encode()
    session = f"{SESSION_VAR}={os.environ[SESSION_VAR]}".encode()
    found = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (state != "Z" and b"forwarder" in cmd and marker in cmd and b"pytest" not in cmd
                and session in env):
            found.add(int(d.name))
    return found


@pytest.fixture(scope="session", autouse=True)
def no_forwarder_left_behind() -> Iterator[None]:
    """Every test stops what it started: a forwarder still running after the session is a
    test bug (it would hold ports and namespaces).  Survivors are killed and reported."""
    before = _forwarders()
    yield
    deadline = time.monotonic() + 10
    left = _forwarders() - before
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _forwarders() - before
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"forwarder processes left behind by the tests: {sorted(left)}"


@pytest.fixture(scope="session")
def installed_forwarder() -> Iterator[Installed]:
    """The project installed where `nobody` can read it, wherever this checkout lives (a
    clone under a 0700 directory): for tests that start the forwarder as another user.
    Built once per session from the checkout and this venv (tests/installed.py), removed
    at the end even when a test failed."""
    need_root()
    from .installed import install

    with install("nobody") as inst:
        yield inst
