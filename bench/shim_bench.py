"""Shim benchmark: revenant's shim vs the stock runc shim, side by side on one private containerd.

* start-to-exit: wall time of `ctr run --rm <busybox> <id> true`, median (and p10/p90) of N runs,
  the two runtimes interleaved so machine noise hits both alike;
* idle shim RSS: resident memory of the shim serving one `sleep` task, after it settled;
* where revenant's time goes: interpreter start, the `start` action, the server's imports.

  .venv/bin/python bench/shim_bench.py --runs 30
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from bench.shimprocs import rss_pss_kib, shim_pids  # noqa: E402
from harness.containerd import ContainerdNode  # noqa: E402
from harness.images import build_test_images  # noqa: E402
from harness.tools import SYSTEM_PATH  # noqa: E402

RUNC, REVENANT = "io.containerd.runc.v2", "io.containerd.revenant.v1"
VENV_PY = REPO / ".venv" / "bin" / "python"
SHIM = REPO / ".venv" / "bin" / "containerd-shim-revenant-v1"


def run_flags(node: ContainerdNode, runtime: str) -> list[str]:
    return ["--runtime", runtime] + (["--runc-root", str(node.runc_root)] if runtime == RUNC else [])


def time_run(node: ContainerdNode, runtime: str, image: str, cid: str) -> float:
    t0 = time.perf_counter()
    node.ctr("run", "--rm", *run_flags(node, runtime), image, cid, "true", input="")
    return time.perf_counter() - t0


def idle_memory(node: ContainerdNode, runtime: str, image: str, count: int) -> tuple[int, int, int]:
    """(shim processes, total VmRSS KiB, total Pss KiB) of the shims serving `count` idle tasks (and
    of revenant's zygote)."""
    ids = [f"idle-{runtime.split('.')[-2]}-{i}" for i in range(count)]
    for cid in ids:
        node.ctr("run", "-d", *run_flags(node, runtime), image, cid, "sleep", "1000", input="")
    time.sleep(2.0)  # let start-up garbage settle
    pids = shim_pids(node.address, b"containerd-shim-runc-v2" if runtime == RUNC else b"containerd-shim-revenant-v1")
    if runtime == REVENANT:  # the zygote that forked them, if any, counts too
        pids += shim_pids(node.address, b"shim.daemon.zygote")
    rss = pss = 0
    for pid in pids:
        r, p = rss_pss_kib(pid)
        rss, pss = rss + r, pss + p
    for cid in ids:
        node.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
    for cid in ids:
        for _ in range(100):
            if "STOPPED" in node.ctr("task", "ls").stdout.split(cid, 1)[-1].split("\n", 1)[0]:
                break
            time.sleep(0.05)
        node.ctr("task", "rm", "-f", cid, check=False)
        node.ctr("container", "rm", cid, check=False)
    return len(pids), rss, pss


def median_wall(argv: list[str], n: int = 15) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# What a fresh shim imports and wires before it can answer Create (shim.daemon.server.build), and the
# modules it imported on top before protection, checkpointing and the GPU hooks were deferred.
WIRING = """
import os, socket, sys, tempfile
from shim.daemon.main import parse_args
from shim.daemon.server import build
path = os.path.join(tempfile.mkdtemp(), "s")
socket.socket(socket.AF_UNIX).bind(path)
build(parse_args(["-namespace", "ns", "-id", "c", "start"]), path)
"""
EAGER = "import shim.protect.manager, shim.checkpoint, shim.gpu.hooks, shim.task.checkpoint_backend\n"


def breakdown(installed_bin: Path) -> dict[str, float]:
    bundle = Path(tempfile.mkdtemp(prefix="shim-bench-")) / "state" / "io.containerd.runtime.v2.task" / "ns" / "x"
    (bundle / "rootfs").mkdir(parents=True)
    python = str(installed_bin / "python")
    delete = ["-namespace", "ns", "-id", "x", "-bundle", str(bundle), "delete"]
    return {
        "installed layout: python -c pass (interpreter start)": median_wall([python, "-c", "pass"]),
        "installed layout: python -I -S -c pass (no site at all)": median_wall([python, "-I", "-S", "-c", "pass"]),
        "dev venv: python -c pass (site runs the editable install's import finder)": median_wall(
            [str(VENV_PY), "-c", "pass"]
        ),
        "dev venv: shim -v (interpreter + entry point)": median_wall([str(SHIM), "-v"]),
        "installed layout: shim delete, nothing left to clean (after every task)": median_wall(
            [str(installed_bin / "containerd-shim-revenant-v1"), *delete]
        ),
        "dev venv: shim delete, the same": median_wall([str(SHIM), *delete]),
        "installed layout: interpreter + server wiring as a fresh shim does it (build(), protection deferred)": (
            median_wall([python, "-c", WIRING])
        ),
        "installed layout: the same + the modules protection/checkpointing load (every shim before)": median_wall(
            [python, "-c", EAGER + WIRING]
        ),
    }


def fork_to_serving_ms(log_path: Path) -> dict[str, list[float]]:
    """The shims' own "serving on ... (N ms after fork by WHO)" lines, copied into containerd's log,
    by who forked them (`start` itself, or the zygote)."""
    found: dict[str, list[float]] = {}
    text = log_path.read_text(errors="replace")
    for ms, who in re.findall(r"serving on \S+ \((\d+) ms after fork by ([^)]+)\)", text):
        found.setdefault(who, []).append(float(ms))
    return found


def installed_layout() -> Path:
    """A venv laid out like `pip install .` leaves it: plain sys.path entries, no editable-install
    import hook in site (which the dev venv's every interpreter start pays). Returns its bin/."""
    root = Path(tempfile.mkdtemp(prefix="shim-bench-venv-"))
    subprocess.run([str(VENV_PY), "-m", "venv", "--without-pip", str(root)], check=True)
    dev_site = next((REPO / ".venv" / "lib").glob("python3*/site-packages"))
    site = next((root / "lib").glob("python3*/site-packages"))
    (site / "revenant.pth").write_text(f"{REPO}\n{REPO / 'proto'}\n{dev_site}\n")
    script = root / "bin" / "containerd-shim-revenant-v1"
    script.write_text(
        f"#!{root / 'bin' / 'python'}\nimport sys\nfrom shim.daemon.main import main\n"
        "if __name__ == '__main__':\n    sys.exit(main())\n"
    )
    script.chmod(0o755)
    return root / "bin"


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


VARIANTS = {
    "runc": "io.containerd.runc.v2 (stock Go shim)",
    "revenant": "io.containerd.revenant.v1, dev venv (editable install), REVENANT_SHIM_SHARED=1",
    "installed": "io.containerd.revenant.v1, installed layout (no editable import hook), REVENANT_SHIM_SHARED=1",
    "cold": "io.containerd.revenant.v1, installed layout, default: a fresh shim per container (zygote)",
    "cold-dev": "io.containerd.revenant.v1, dev venv, default: a fresh shim per container (zygote)",
    "cold-nozygote": "io.containerd.revenant.v1, installed layout, a fresh shim per container, REVENANT_SHIM_ZYGOTE=0",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)} (runc always)"
    )
    ap.add_argument("--no-memory", action="store_true", help="skip the idle memory table")
    args = ap.parse_args()
    chosen = ["runc"] + [v for v in args.variants.split(",") if v in VARIANTS and v != "runc"]

    images = build_test_images(Path(tempfile.mkdtemp(prefix="shim-bench-images-")))
    installed_bin = installed_layout()
    nodes: dict[str, ContainerdNode] = {}
    try:
        plan = {
            "runc": ("dev", RUNC),
            "revenant": ("dev", REVENANT),
            "installed": ("installed", REVENANT),
            "cold": ("cold", REVENANT),
            "cold-dev": ("cold-dev", REVENANT),
            "cold-nozygote": ("cold-nozygote", REVENANT),
        }
        plan = {v: plan[v] for v in chosen}
        for name in sorted({name for name, _ in plan.values()}):
            node = ContainerdNode(f"bench-{name}")
            if name in ("installed", "cold", "cold-nozygote"):
                node.env["PATH"] = f"{installed_bin}:{SYSTEM_PATH}"
            if name == "cold-nozygote":
                node.env["REVENANT_SHIM_ZYGOTE"] = "0"
            if not name.startswith("cold"):
                node.env["REVENANT_SHIM_SHARED"] = "1"
            nodes[name] = node
            node.start()
        image = {name: node.import_image(images.busybox) for name, node in nodes.items()}
        for variant, (name, rt) in plan.items():  # warm page cache and snapshots
            time_run(nodes[name], rt, image[name], f"warm-{variant}")
        times: dict[str, list[float]] = {v: [] for v in plan}
        for i in range(args.runs):
            order = list(plan) if i % 2 == 0 else list(reversed(plan))  # noise hits all alike
            for variant in order:
                name, rt = plan[variant]
                times[variant].append(time_run(nodes[name], rt, image[name], f"b{i}-{variant}"))
        serving = {name: fork_to_serving_ms(nodes[name].log_path) for name in nodes if name.startswith("cold")}
        memory = {}
        if not args.no_memory:
            memory["runc"] = [idle_memory(nodes["dev"], RUNC, image["dev"], n) for n in (1, 10)]
            for variant in ("installed", "cold"):
                if variant in nodes:
                    memory[variant] = [idle_memory(nodes[variant], REVENANT, image[variant], n) for n in (1, 10)]
    finally:
        for node in nodes.values():
            node.destroy()
    parts = breakdown(installed_bin)

    base = statistics.median(times["runc"])
    print(f"runs per variant: {args.runs}, interleaved")
    print("| shim | median (ms) | p10 (ms) | p90 (ms) | ratio to runc shim |")
    print("|---|---|---|---|---|")
    for variant, v in times.items():
        med = statistics.median(v)
        print(
            f"| {VARIANTS[variant]} | {med * 1e3:.0f} | {pct(v, 0.1) * 1e3:.0f} | {pct(v, 0.9) * 1e3:.0f} "
            f"| {med / base:.2f} |"
        )
    print(
        "\n| shim | processes for 1 idle task (shims + zygote) | VmRSS / Pss (MiB) | processes for 10 tasks "
        "| total VmRSS / Pss (MiB) |"
    )
    print("|---|---|---|---|---|")
    for variant, (one, ten) in memory.items():
        print(
            f"| {VARIANTS[variant]} | {one[0]} | {one[1] / 1024:.1f} / {one[2] / 1024:.1f} "
            f"| {ten[0]} | {ten[1] / 1024:.1f} / {ten[2] / 1024:.1f} |"
        )
    print()
    for name, by in serving.items():
        for who, values in by.items():
            print(
                f"{name}: a fresh shim forked by {who} serves its socket {statistics.median(values):.0f} ms "
                f"(median; p90 {pct(values, 0.9):.0f}) after the fork, {len(values)} shims"
            )
    print("\nrevenant start-up parts (median wall, ms):")
    for name, value in parts.items():
        print(f"  {name}: {value * 1e3:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
