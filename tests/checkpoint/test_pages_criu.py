"""Page-granular incremental checkpoints on real CRIU dumps: two dumps of a memjob one step apart (it
rewrites 5 % of its pages, one by one, at pseudo-random positions), the second upload is small."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from harness import images
from harness.memjob import read_steps
from harness.store_util import tree_digest
from harness.tools import require
from harness.wait import wait_until
from shim.protect.checkpointer import CRIU_DIR, PAGE_IMAGES
from shim.store import open_store

MIB = 32
KEY = "default/pages/main"


@pytest.fixture
def memjob(test_images: images.TestImages, tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("criu dump needs root")
    log = tmp_path / "memjob.log"
    args = ["--mib", str(MIB), "--mutate", "0.05", "--seed", "9", "--interval-ms", "1500", "--log", str(log)]
    proc = subprocess.Popen(
        [str(test_images.memjob_binary), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield proc, log
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def step_after(log: Path, n: int) -> int:
    return wait_until(lambda: (s := read_steps(log)) and s[-1].n > n and s[-1].n, 60, f"memjob step > {n}")


def dump(pid: int, dest: Path) -> Path:
    images = dest / CRIU_DIR
    images.mkdir(parents=True)
    criu = require("criu", "criu")
    subprocess.run([criu, "dump", "-t", str(pid), "-D", str(images), "--leave-running", "-o", "dump.log"], check=True)
    (images / "dump.log").unlink()
    return dest


def test_second_checkpoint_of_a_real_dump_uploads_what_changed(memjob, tmp_path: Path) -> None:
    proc, log = memjob
    step = step_after(log, 0)
    first = dump(proc.pid, tmp_path / "one")
    step_after(log, step)
    second = dump(proc.pid, tmp_path / "two")
    assert list((first / CRIU_DIR).glob("pages-*.img"))

    store = open_store(f"file://{tmp_path}/store")
    one = store.put(KEY, first, page_images=PAGE_IMAGES)
    two = store.put(KEY, second, page_images=PAGE_IMAGES)
    # One step rewrites 5 % of the pages (two steps if a dump was slow: 10 %); the page table adds 0.4 %.
    assert two.bytes_uploaded < 0.15 * one.bytes_uploaded, (two.bytes_uploaded, one.bytes_uploaded)
    cdc = open_store(f"file://{tmp_path}/cdc")
    cdc_one = cdc.put(KEY, first)
    assert cdc.put(KEY, second).bytes_uploaded > 0.3 * cdc_one.bytes_uploaded  # what FastCDC alone costs

    shutil.rmtree(first)
    store.prune(KEY, keep=1)
    store.gc(grace_seconds=0)
    store.get(KEY, tmp_path / "restored")
    assert tree_digest(tmp_path / "restored") == tree_digest(second)
    assert store.verify() == []
