"""Where a checkpoint is assembled before it goes to the store.

Memory-backed staging (tmpfs, /dev/shm by default) keeps the task's freeze short: CRIU writes pages
at memory speed instead of disk speed, and the job runs on while the chunks are hashed, compressed and
uploaded. When tmpfs lacks room for the expected image, staging falls back to the bundle's disk.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

HEADROOM = 1.25  # CRIU images run a little larger than the resident set they dump


def process_tree_rss(pid: int) -> int:
    """Resident bytes of pid and its descendants (what CRIU is about to write)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def make_staging_dir(preferred: Path, fallback: Path, expected_bytes: int, prefix: str) -> Path:
    """A fresh directory in `preferred` when it has room for `expected_bytes`, else in `fallback`."""
    for base in (preferred, fallback):
        try:
            base.mkdir(parents=True, exist_ok=True, mode=0o700)
            free = shutil.disk_usage(base).free
        except OSError as e:
            log.warning("staging dir %s unusable: %s", base, e)
            continue
        if base == fallback or free >= expected_bytes * HEADROOM:
            return Path(tempfile.mkdtemp(prefix=prefix, dir=base))
        log.info(
            "staging: %s has %d MiB free, %d MiB expected; using %s", base, free >> 20, expected_bytes >> 20, fallback
        )
    raise OSError(f"no usable staging directory ({preferred}, {fallback})")


def remove_staging_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        log.warning("could not remove staging dir %s", path)


def runtime_versions() -> dict[str, str]:
    """runc and CRIU versions for the checkpoint's metadata (restores across versions are a risk)."""
    import subprocess

    versions: dict[str, str] = {}
    for name, args in (("runc", ["runc", "--version"]), ("criu", ["criu", "--version"])):
        try:
            out = subprocess.run(args, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        first = out.splitlines()[0] if out else ""
        versions[name] = first.split(":", 1)[-1].strip().removeprefix("runc version ").strip()
    versions["kernel"] = os.uname().release
    return versions
