"""Checkpoint and restore of a memjob: revenant's shim vs containerd's stock runc shim, side by side.

For each size (--gib, repeatable) and each shim, on one private containerd node:
  run a memjob with that much resident state -> `ctr task checkpoint` (leave running) for CRIU's own
  statistics (frozen time = how long the job stood still, freezing, memdump/memwrite, pages) ->
  `ctr container checkpoint --task --rw` (timed: the whole checkpoint as a user sees it, image into
  containerd's content store included) -> task and container removed -> `ctr containers restore
  --live --rw` (timed) -> the restored job must reach its next steps.
CRIU statistics: revenant's from revenant.v1.Control/Stats; the stock shim's from the stats-dump in
the work directory that `ctr task checkpoint --work-path` makes it keep.

    flock /tmp/revenant-heavy.lock .venv/bin/python bench/checkpoint_bench.py --gib 1 --gib 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from harness.containerd import ContainerdNode  # noqa: E402
from harness.images import build_test_images  # noqa: E402
from harness.memjob import memjob_args, read_steps, wait_for_step  # noqa: E402
from shim.checkpoint.criu_stats import read_dump_stats  # noqa: E402

REVENANT, RUNC = "io.containerd.revenant.v1", "io.containerd.runc.v2"


def ctr(node: ContainerdNode, *args: str) -> subprocess.CompletedProcess[str]:
    return node.ctr(*args, input="", timeout=900)


def flags(node: ContainerdNode, runtime: str) -> list[str]:
    return ["--runtime", runtime] + ([] if runtime == REVENANT else ["--runc-root", str(node.runc_root)])


def stock_criu_stats(node: ContainerdNode, cid: str) -> dict:
    """The stock shim deletes its CRIU work directory (and stats-dump with it) unless the request names
    one: `ctr task checkpoint --work-path` does, for runc runtimes."""
    with tempfile.TemporaryDirectory(dir=node.dir) as d:
        ctr(node, "task", "checkpoint", "--image-path", f"{d}/images", "--work-path", f"{d}/work", cid)
        stats = read_dump_stats(Path(d) / "work")
    return stats.as_dict() if stats else {}


def revenant_criu_stats(node: ContainerdNode, cid: str) -> dict:
    """`ctr task checkpoint` (ctr sends no CheckpointOptions to other runtimes: the image lands in the
    content store), then the shim's own record of that dump over Control/Stats."""
    name = ctr(node, "task", "checkpoint", cid).stdout.strip()
    ctr(node, "images", "rm", name)
    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "revenant"),
            "stats",
            cid,
            "--json",
            "--namespace",
            node.namespace,
            "--state",
            str(node.state),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)["criu"]


def one_run(node: ContainerdNode, image: str, runtime: str, gib: float, tag: str) -> dict[str, float]:
    cid, ref = f"bench-{tag}", f"localhost/bench/{tag}:1"
    ctr(
        node,
        "run",
        "-d",
        *flags(node, runtime),
        image,
        cid,
        *memjob_args(int(gib * 1024), 7, mutate=0.01, interval_ms=500),
    )
    log = node.rootfs(cid) / "var/log/memjob.log"
    wait_for_step(log, 2, timeout=600)  # every page written at least once
    # CRIU's statistics come from a `ctr task checkpoint` (leave running) just before the timed one.
    criu = revenant_criu_stats(node, cid) if runtime == REVENANT else stock_criu_stats(node, cid)
    t = time.monotonic()
    ctr(node, "container", "checkpoint", "--task", "--rw", cid, ref)
    checkpoint_s = time.monotonic() - t
    at = read_steps(log)[-1].n
    ctr(node, "task", "kill", "-s", "SIGKILL", cid)
    time.sleep(1)
    ctr(node, "task", "rm", "-f", cid)
    ctr(node, "containers", "rm", cid)
    t = time.monotonic()
    ctr(node, "containers", "restore", "--live", "--rw", cid + "r", ref)
    restore_s = time.monotonic() - t
    wait_for_step(node.rootfs(cid + "r") / "var/log/memjob.log", at + 2, timeout=600)  # it runs on
    ctr(node, "task", "kill", "-s", "SIGKILL", cid + "r")
    time.sleep(1)
    ctr(node, "task", "rm", "-f", cid + "r")
    ctr(node, "containers", "rm", cid + "r")
    ctr(node, "images", "rm", ref)
    return {
        "checkpoint_s": checkpoint_s,
        "frozen_s": criu.get("frozen_time_us", 0) / 1e6,
        "freezing_s": criu.get("freezing_time_us", 0) / 1e6,
        "memdump_s": criu.get("memdump_time_us", 0) / 1e6,
        "memwrite_s": criu.get("memwrite_time_us", 0) / 1e6,
        "pages_written": criu.get("pages_written", 0),
        "restore_s": restore_s,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, action="append", help="memjob size in GiB (repeatable); default 1 and 4")
    ap.add_argument("--repeat", type=int, default=1, help="runs per size and shim (alternating shims)")
    args = ap.parse_args()
    sizes = args.gib or [1, 4]
    images = build_test_images(Path(tempfile.mkdtemp(prefix="ckpt-bench-img-")))
    node = ContainerdNode("bench")
    node.start()
    results: dict[tuple[float, str], list[dict[str, float]]] = {}
    try:
        image = node.import_image(images.memjob)
        for gib in sizes:
            for r in range(args.repeat):
                order = (RUNC, REVENANT) if r % 2 == 0 else (REVENANT, RUNC)
                for runtime in order:
                    short = "revenant" if runtime == REVENANT else "runc"
                    res = one_run(node, image, runtime, gib, f"{short}-{gib:g}g-{r}")
                    results.setdefault((gib, runtime), []).append(res)
                    print(f"# {gib} GiB {short:8s} " + " ".join(f"{k}={v:.3f}" for k, v in res.items()), flush=True)
    finally:
        node.destroy()
    print(f"\nmachine: {platform.node()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f} (1 min) at the end")
    print("| GiB | shim | checkpoint s | CRIU frozen s | memdump s | memwrite s | pages written | restore s |")
    print("|---|---|---|---|---|---|---|---|")
    for (gib, runtime), runs in sorted(results.items()):
        med = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}
        name = "revenant" if runtime == REVENANT else "runc (stock)"
        print(
            f"| {gib:g} | {name} | {med['checkpoint_s']:.2f} | {med['frozen_s']:.3f} | {med['memdump_s']:.3f} | "
            f"{med['memwrite_s']:.3f} | {int(med['pages_written'])} | {med['restore_s']:.2f} |"
        )
    print("\n| GiB | checkpoint ratio (revenant/stock) | frozen ratio | restore ratio |")
    print("|---|---|---|---|")
    for gib in sizes:
        rv = results[(gib, REVENANT)]
        st = results[(gib, RUNC)]

        def med(runs: list[dict[str, float]], k: str) -> float:
            return sorted(r[k] for r in runs)[len(runs) // 2]

        print(
            f"| {gib:g} | {med(rv, 'checkpoint_s') / med(st, 'checkpoint_s'):.2f} | "
            f"{med(rv, 'frozen_s') / max(med(st, 'frozen_s'), 1e-9):.2f} | "
            f"{med(rv, 'restore_s') / med(st, 'restore_s'):.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
