"""bench/sweep_report.py: the sweep's results file -> tables, a labelled extrapolation and PNG plots."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


report = load_module("sweep_report")


def size_entry(gib: float, k: float) -> dict:
    """A size whose every figure is k seconds per GiB plus 1 s (so the fit is known exactly)."""
    t = 1 + k * gib
    return {
        "gib": gib,
        "revenant": {
            "freeze_s": t,
            "commit_local_s": 2 * t,
            "notice_s3_s": 3 * t,
            "s3_shim_total_s": 3 * t - 0.5,
            "s3_freeze_s": t,
            "s3_freeze_parts": {"criu_memdrain_ms": 100.0, "criu_memwrite_ms": 200.0},
            "restore_s": t,
        },
        "runc": {"frozen_s": t, "checkpoint_s": t, "restore_s": t},
        "podman": {"export_s": t, "import_s": None},
    }


def sample() -> dict:
    return {
        "meta": {"command": "x"},
        "sizes": [size_entry(g, 2.0) for g in (0.25, 1, 2, 4)],
        "incremental": {
            "gib": 0.25,
            "steps_between": 5,
            "mutate": 0.005,
            "checkpoints": [
                {"seq": 1, "bytes_read": 2**20 * 100, "bytes_uploaded": 2**20 * 100, "step": 3},
                {"seq": 2, "bytes_read": 2**20 * 100, "bytes_uploaded": 2**20 * 10, "step": 9},
            ],
        },
        "interruptions": {
            "mib": 128,
            "steps": 100,
            "runs": [
                {"k": 2, "wall_s": 110.0, "moves_s": 10.0, "lost": 0},
                {"k": 0, "wall_s": 100.0, "moves_s": 0.0, "lost": 0},
            ],
        },
    }


def test_linear_fit_recovers_slope_and_intercept() -> None:
    assert report.linear_fit([(1, 3), (2, 5), (4, 9)]) == pytest.approx((2.0, 1.0))
    assert report.linear_fit([(1, 3), (1, 4)]) is None  # one distinct size: no slope


def test_extrapolation_is_labelled_and_uses_sizes_from_one_gib() -> None:
    table = report.extrapolation_table(sample(), at_gib=16)
    assert "EXTRAPOLATED to 16 GiB from sizes >= 1 GiB" in table
    # freeze_s = 1 + 2 * GiB: 33 s at 16 GiB, fitted through 1, 2, 4 (0.25 left out)
    row = next(line for line in table.splitlines() if "(freeze_s)" in line)
    assert "| 2.00 | 33.0 s | 36.0 s | 1, 2, 4 GiB |" in row  # scaled: 9 s at 4 GiB x 4


def test_a_falling_fit_is_not_extrapolated() -> None:
    data = {"sizes": [size_entry(1, 2.0), {**size_entry(4, 0.1), "gib": 4}]}  # 3 s at 1 GiB, 1.4 s at 4
    row = next(line for line in report.extrapolation_table(data, 16).splitlines() if "(freeze_s)" in line)
    assert "no usable slope" in row and "| 5.6 s |" in row


def test_overheads_against_the_uninterrupted_run() -> None:
    rows = report.overheads(sample())
    assert [r["k"] for r in rows] == [0, 2]
    assert rows[1]["overhead_pct"] == pytest.approx(10.0) and rows[1]["per_move_s"] == pytest.approx(5.0)
    assert "| 2 | 110.0 | 10.00 % | 5.00 | 0 |" in report.interruptions_table(sample())


def test_tables_carry_every_section_and_the_notice_breakdown() -> None:
    text = report.tables(sample())
    assert "| 4 | 9.00 | 9.00 (9.00) | 9.00 | 18.00 | 27.00 | 9.00 | 9.00 | - | - |" in text  # null -> "-"
    # notice 27 s = agent 0.5 + frozen 9 (CRIU 0.1 / 0.2) + put 17.5; local put 18 - 9 = 9
    assert "| 4 | 27.00 | 0.50 | 9.00 (0.10 / 0.20) | 17.50 | 9.00 | 8.50 |" in text
    assert "| 2 | 6 | 100.0 | 10.0 | 10.0 % |" in text  # steps since the previous checkpoint


def test_a_size_run_one_job_at_a_time_says_so() -> None:
    data = sample()
    data["sizes"][-1]["one_job_at_a_time"] = True
    assert "| 4 (one job at a time) | 9.00 |" in report.size_table(data)
    # The sweep decides by the memory available now: a tiny job pair fits, one beyond any machine does not.
    sweep = load_module("sweep_bench")
    assert sweep._both_jobs_fit(1) and not sweep._both_jobs_fit(1 << 40)


def test_plot_only_redraws_all_three_small_pngs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the dev extra installs matplotlib")
    sweep = load_module("sweep_bench")
    results = tmp_path / "sweep.json"
    results.write_text(json.dumps(sample()))
    out = tmp_path / "plots"
    assert sweep.main(["--plot-only", str(results), "--out-dir", str(out)]) == 0
    for name in (report.PNG_SIZES, report.PNG_INCREMENTAL, report.PNG_INTERRUPTIONS):
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < png.stat().st_size < 200_000, name


def test_files_merge_by_size_and_missing_sections_are_not_drawn(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the dev extra installs matplotlib")
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"sizes": sample()["sizes"], "interruptions": {"runs": []}}))
    later = size_entry(1, 5.0)
    del later["runc"]["restore_s"]  # a later run that skipped the restores
    second.write_text(json.dumps({"sizes": [later], "interruptions": sample()["interruptions"]}))
    data = report.load([first, second])
    assert [e["gib"] for e in data["sizes"]] == [0.25, 1, 2, 4] and "incremental" not in data
    assert data["sizes"][1]["revenant"]["freeze_s"] == 6.0  # the later file's 1 GiB figures
    assert data["sizes"][1]["runc"]["restore_s"] == 3.0  # and the earlier one's where the later has none
    assert len(data["interruptions"]["runs"]) == 2
    written = report.plot(data, tmp_path)
    assert sorted(p.name for p in written) == sorted([report.PNG_SIZES, report.PNG_INTERRUPTIONS])


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"sizes": [{"gib": -1}]},
        {"sizes": [{"gib": "4"}]},
        {"sizes": [{"gib": 1, "runc": [1]}]},
        {"incremental": {"checkpoints": [{"bytes_uploaded": "many"}]}},
        {"interruptions": {"runs": [{"k": 1.5, "wall_s": 3}]}},
        {"interruptions": {"runs": [{"k": 1, "wall_s": float("nan")}]}},
    ],
)
def test_malformed_results_are_refused_with_a_clear_error(tmp_path: Path, bad: object) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError):
        report.load([path])


def test_heavy_lock_is_taken_or_inherited_from_a_parent_flock(tmp_path: Path) -> None:
    """Sizes above 1 GiB hold the machine's heavy-run lock; under `flock LOCK sweep_bench` (the parent
    holds it) the sweep runs instead of waiting for itself forever."""
    lock = tmp_path / "heavy.lock"
    probe = (
        "import sys; from pathlib import Path; sys.path.insert(0, '.');"
        "import bench.sweep_bench as s; s.HEAVY_LOCK = Path(sys.argv[1]);"
        "ctx = s.heavy_lock(True); ctx.__enter__(); print('inside', flush=True)"
    )
    py = [sys.executable, "-c", probe, str(lock)]
    alone = subprocess.run(py, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert alone.stdout.strip() == "inside" and "holding" in alone.stderr, alone.stderr
    nested = subprocess.run(["flock", str(lock), *py], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert nested.stdout.strip() == "inside" and "held by a parent" in nested.stderr, nested.stderr
    # Held by a process that is not an ancestor: the sweep waits (here: gives up after the timeout).
    with subprocess.Popen(["flock", str(lock), "sleep", "30"]) as holder:
        try:
            for _ in range(50):
                if lock_held(lock):
                    break
                time.sleep(0.1)
            with pytest.raises(subprocess.TimeoutExpired):
                subprocess.run(py, cwd=REPO, capture_output=True, text=True, timeout=3)
        finally:
            holder.kill()


def lock_held(lock: Path) -> bool:
    return lock.exists() and str(lock.stat().st_ino) in Path("/proc/locks").read_text()
