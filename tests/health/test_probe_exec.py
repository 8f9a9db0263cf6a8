"""exec check with real scripts in a temp dir: exit 0 and 1, what the command gets (argv
only, a minimal environment, stdin /dev/null, our uid), output capped and escaped, a
command that cannot run, a command that sleeps past the timeout with children of its own
(killed and reaped: afterwards none of their pids exists), near-timeout exits."""

from __future__ import annotations

import ctypes
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from forwarder.config.model import CheckConfig, Endpoint
from forwarder.health.checks import command
from forwarder.health.probe import run_check

from .conftest import Run
from .servers import INSIDE, LATE, OUTSIDE, T

BACKEND = Endpoint("127.0.0.1", 8025)
_PR_SET_CHILD_SUBREAPER, _PR_GET_CHILD_SUBREAPER = 36, 37


@pytest.fixture(autouse=True)
def subreaper_restored() -> Iterator[None]:
    """The check makes its process a child subreaper; in the forwarder that is for good,
    here it is undone after each test so the rest of the pytest session is not changed."""
    libc = ctypes.CDLL(None, use_errno=True)
    before = ctypes.c_int(0)
    libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(before), 0, 0, 0)
    command.become_subreaper.cache_clear()
    yield
    libc.prctl(_PR_SET_CHILD_SUBREAPER, before.value, 0, 0, 0)
    command.become_subreaper.cache_clear()


def script(tmp: Path, name: str, body: str, mode: int = 0o755) -> str:
    path = tmp / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(mode)
    return str(path)


def exec_check(*argv: str, timeout: float = 2.0, name: str = "") -> CheckConfig:
    return CheckConfig(kind="exec", command=argv, timeout=timeout, name=name)


def gone(pid: int) -> bool:
    """No such process, not even a zombie."""
    return not Path(f"/proc/{pid}").exists()


def pids(path: Path) -> list[int]:
    return [int(p) for p in path.read_text().split()]


# ---------------------------------------------------------------------------------------
# up and down


def test_exit_0_is_up_and_exit_1_down(run: Run, tmp_path: Path) -> None:
    async def main() -> None:
        ok = script(tmp_path, "ok", f"echo 'OK - queue 3'; echo $$ > {tmp_path}/pid; exit 0\n")
        res = await run_check(exec_check(ok), BACKEND)
        assert (res.ok, res.result, res.detail) == (True, "success", "exit 0: 'OK - queue 3'")
        bad = script(tmp_path, "bad", "echo 'CRITICAL - queue 5000' >&2; exit 1\n")
        res = await run_check(exec_check(bad), BACKEND)
        assert (res.ok, res.result, res.detail) == (False, "failure",
                                                    "exit 1: 'CRITICAL - queue 5000'")
    run(main())
    assert gone(pids(tmp_path / "pid")[0])  # reaped: no zombie


def test_what_the_command_gets(run: Run, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """argv as given (no shell), the minimal environment, stdin /dev/null, cwd /, our uid."""
    monkeypatch.setenv("FORWARDER_TEST_SECRET", "must not leak")
    out = tmp_path / "out"
    probe = script(tmp_path, "introspect", f"""
cp /proc/$$/environ {out}.env
readlink /proc/$$/fd/0 > {out}.stdin
readlink /proc/$$/cwd > {out}.cwd
id -u > {out}.uid
printf '%s\\n' "$@" > {out}.args
""")

    async def main() -> None:
        res = await run_check(exec_check(probe, "a b", "$HOME;", name="james-queue"),
                              Endpoint("::1", 8025))
        assert res.ok, res
    run(main())
    env = dict(kv.split("=", 1) for kv in
               Path(f"{out}.env").read_bytes().decode().split("\0") if kv)
    assert env == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "FORWARDER_BACKEND_HOST": "::1",
        "FORWARDER_BACKEND_PORT": "8025",
        "FORWARDER_BACKEND": "[::1]:8025",
        "FORWARDER_CHECK": "james-queue",
    }
    assert Path(f"{out}.stdin").read_text().strip() == "/dev/null"
    assert Path(f"{out}.cwd").read_text().strip() == "/"
    assert int(Path(f"{out}.uid").read_text()) == os.getuid()
    assert Path(f"{out}.args").read_text() == "a b\n$HOME;\n"


def test_output_is_capped_escaped_and_never_blocks(run: Run, tmp_path: Path) -> None:
    async def main() -> None:
        # 1 MB: far more than a pipe holds, so a check that stopped reading would hang
        chatty = script(tmp_path, "chatty",
                        "printf '\\033[31mred\\001\\n'; head -c 1000000 /dev/zero; exit 3\n")
        res = await run_check(exec_check(chatty), BACKEND)
        assert (res.ok, res.result) == (False, "failure"), res
        assert res.detail.startswith("exit 3: '\\x1b[31mred\\x01\\n\\x00\\x00")
        more = 1_000_000 + len("\x1b[31mred\x01\n") - command.OUTPUT_CAP
        assert res.detail.endswith(f"\\x00'... ({more} more bytes)"), res.detail[-60:]
        assert all(c.isprintable() for c in res.detail)
        assert res.duration < 1.0
    run(main())


def test_killed_by_a_signal(run: Run, tmp_path: Path) -> None:
    async def main() -> None:
        s = script(tmp_path, "suicide", "kill -TERM $$\n")
        res = await run_check(exec_check(s), BACKEND)
        assert (res.ok, res.detail) == (False, f"{s} killed by SIGTERM"), res
    run(main())


def test_exit_0_leaving_a_background_child(run: Run, tmp_path: Path) -> None:
    """The child holds stdout open; the check neither waits for it nor leaves it running."""
    async def main() -> None:
        s = script(tmp_path, "leaky", f"sleep 30 & echo $! > {tmp_path}/child; echo ok\n")
        res = await run_check(exec_check(s), BACKEND)
        assert (res.ok, res.detail) == (True, "exit 0: 'ok'"), res
        assert res.duration < 1.0
    run(main())
    assert gone(pids(tmp_path / "child")[0])


# ---------------------------------------------------------------------------------------
# cannot run


def test_commands_that_cannot_run(run: Run, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    plain = script(tmp_path, "plain", "exit 0\n", mode=0o644)
    bad_interp = tmp_path / "badinterp"
    bad_interp.write_text("#!/nonexistent/interpreter\n")
    bad_interp.chmod(stat.S_IRWXU)

    async def main() -> None:
        cases = [
            ((missing,), f"cannot run {missing}: no such file"),
            ((plain,), f"cannot run {plain}: permission denied (not executable by this user?)"),
            ((str(bad_interp),),
             f"cannot run {bad_interp}: its interpreter (the #! line) was not found"),
            ((str(tmp_path),), f"cannot run {tmp_path}: it is a directory"),
            (("no-such-command-here",), "cannot run no-such-command-here: no such file in "
                                        f"PATH {command.PATH}"),
            ((), "exec check without a command"),
        ]
        for argv, detail in cases:
            res = await run_check(exec_check(*argv), BACKEND)
            assert (res.ok, res.result, res.detail) == (False, "failure", detail), argv
    run(main())  # (even root cannot exec a file without an x bit: the 0644 case holds)


def test_relative_command_found_in_the_fixed_path(run: Run) -> None:
    async def main() -> None:
        res = await run_check(exec_check("true"), BACKEND)
        assert res.ok, res
        res = await run_check(exec_check("false"), BACKEND)
        assert (res.ok, res.detail) == (False, "exit 1"), res
    run(main())


# ---------------------------------------------------------------------------------------
# timeouts: the whole group killed and reaped


def test_timeout_kills_and_reaps_the_group(run: Run, tmp_path: Path) -> None:
    s = script(tmp_path, "hang", f"""
(sleep 30 & echo $! > {tmp_path}/grandchild; wait) &
sleep 30 &
echo $$ $! > {tmp_path}/pids
echo started
wait
""")

    async def main() -> None:
        res = await run_check(exec_check(s, timeout=T), BACKEND)
        assert (res.ok, res.result) == (False, "timeout"), res
        assert res.detail == (f"timed out after {T:g}s waiting for {s} to exit "
                              "(killed with its process group; it said 'started')")
        assert T - 0.01 <= res.duration < T + LATE
    run(main())
    everyone = pids(tmp_path / "pids") + pids(tmp_path / "grandchild")
    assert len(everyone) == 3
    left = [p for p in everyone if not gone(p)]
    assert not left, f"left behind: {left}"


@pytest.mark.parametrize("delay, ok", [pytest.param(INSIDE, True, id="inside"),
                                       pytest.param(OUTSIDE, False, id="outside")])
def test_exit_near_the_timeout(run: Run, tmp_path: Path, delay: float, ok: bool) -> None:
    async def main() -> None:
        s = script(tmp_path, "slow", f"sleep {delay}\necho done\n")
        res = await run_check(exec_check(s, timeout=T), BACKEND)
        assert res.ok is ok, res
        assert res.result == ("success" if ok else "timeout")
        assert res.duration < T + LATE
    run(main())


def test_no_fd_or_process_left_after_many_runs(run: Run, tmp_path: Path) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    s = script(tmp_path, "quick", f"echo $$ >> {tmp_path}/pids\nexit 0\n")

    async def main() -> None:
        for _ in range(20):
            res = await run_check(exec_check(s), BACKEND)
            assert res.ok, res
    run(main())
    assert len(os.listdir("/proc/self/fd")) <= fds
    assert all(gone(p) for p in pids(tmp_path / "pids"))
