"""bench/cpu_census.py: the figures the shim-vs-bare put comparison rests on (bench/RESULTS.md)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_cpu_census_under_test", REPO / "bench" / "cpu_census.py")
assert spec is not None and spec.loader is not None
census_mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = census_mod
spec.loader.exec_module(census_mod)


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds  # this thread's CPU: a sample misses at most one period of it
    while time.thread_time() < end:
        pass


def test_a_thread_that_ended_inside_the_span_still_counts() -> None:
    census = census_mod.Census(os.getpid(), period=0.05).start()
    sampled = threading.Event()

    def work() -> None:
        _spin(0.5)
        sampled.wait(60)  # alive until a sample has seen its CPU (a loaded machine may delay the sampler)

    worker = threading.Thread(target=work, name="census-spin")
    worker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        seen = census.threads_latest.get(worker.native_id)
        if seen is not None and seen.run_ns >= 0.3e9:
            break
        time.sleep(0.05)
    sampled.set()
    worker.join()
    text = census.stop()
    assert worker.native_id not in census_mod.threads(os.getpid())  # gone, yet counted from its samples
    assert census.threads_latest[worker.native_id].run_ns >= 0.3e9
    own = census_mod.threads_diff(census.threads0, census.threads_latest)
    assert own["cpu_s"] >= 0.3
    assert f"process {os.getpid()}" in text


def test_a_child_is_this_bench_s_and_a_stranger_is_not() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        time.sleep(0.2)
        roots = frozenset({os.getpid()})
        snap = census_mod.snapshot(roots)
        assert snap[child.pid].label.startswith("* ")
        assert not snap[1].label.startswith("* ")  # init is nobody's descendant
    finally:
        child.kill()
        child.wait()


def test_machine_diff_splits_mine_from_the_other_tenants() -> None:
    before = {1: census_mod.Proc("* put", 1.0), 2: census_mod.Proc("other", 5.0)}
    after = {
        1: census_mod.Proc("* put", 4.0, 0.5),
        2: census_mod.Proc("other", 6.0),
        3: census_mod.Proc("* weed", 2.0),  # started inside the span: all of its CPU counts
    }
    rows = dict(census_mod.machine_diff(before, after))
    assert rows["(all seen)"] == 6.5  # put 3 + its reaped children 0.5 + other 1 + weed 2
    assert rows["(* this bench's processes)"] == 5.5
    assert rows["(other tenants)"] == 1.0
    assert rows["* put (reaped children)"] == 0.5
