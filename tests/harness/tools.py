"""Finding the programs tests need; a missing one fails the test with the command that installs it."""

from __future__ import annotations

import shutil

import pytest

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def require(program: str, debian_package: str) -> str:
    path = shutil.which(program, path=SYSTEM_PATH)
    if path is None:
        pytest.fail(
            f"{program} is not installed: run `sudo make setup` (or `apt-get install {debian_package}`)",
            pytrace=False,
        )
    return path
