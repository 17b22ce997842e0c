"""Finding the programs tests need; a missing one fails the test with the command that installs it."""

from __future__ import annotations

import shutil
import subprocess

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


def end_process(proc: subprocess.Popen | None, timeout: float | None) -> None:
    """SIGTERM a daemon and wait up to `timeout` s, then SIGKILL it; timeout None: SIGKILL at once."""
    if proc is None or proc.poll() is not None:
        return
    if timeout is None:
        proc.kill()
        proc.wait()
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
