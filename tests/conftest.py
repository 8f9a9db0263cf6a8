from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import pytest


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
