"""Shim benchmark: revenant's shim vs the stock runc shim, side by side on one private containerd.

* start-to-exit: wall time of `ctr run --rm <busybox> <id> true`, median (and p10/p90) of N runs,
  the two runtimes interleaved so machine noise hits both alike;
* idle shim RSS: resident memory of the shim serving one `sleep` task, after it settled;
* where revenant's time goes: interpreter start, the `start` action, the server's imports.

  .venv/bin/python bench/shim_bench.py --runs 30
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

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


def shim_pids(node: ContainerdNode, runtime: str) -> list[int]:
    binary = b"containerd-shim-runc-v2" if runtime == RUNC else b"containerd-shim-revenant-v1"
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if node.address.encode() in argv and binary in argv[0] + (argv[1] if len(argv) > 1 else b""):
            pids.append(int(proc.name))
    return pids


def rss_pss_kib(pid: int) -> tuple[int, int]:
    status = (Path("/proc") / str(pid) / "status").read_text()
    rss = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])
    rollup = (Path("/proc") / str(pid) / "smaps_rollup").read_text()
    pss = int(next(line for line in rollup.splitlines() if line.startswith("Pss:")).split()[1])
    return rss, pss


def idle_memory(node: ContainerdNode, runtime: str, image: str, count: int) -> tuple[int, int, int]:
    """(shim processes, total VmRSS KiB, total Pss KiB) of the shims serving `count` idle tasks."""
    ids = [f"idle-{runtime.split('.')[-2]}-{i}" for i in range(count)]
    for cid in ids:
        node.ctr("run", "-d", *run_flags(node, runtime), image, cid, "sleep", "1000", input="")
    time.sleep(2.0)  # let start-up garbage settle
    pids = shim_pids(node, runtime)
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


def breakdown(installed_bin: Path) -> dict[str, float]:
    bundle = Path(tempfile.mkdtemp(prefix="shim-bench-")) / "state" / "io.containerd.runtime.v2.task" / "ns" / "x"
    (bundle / "rootfs").mkdir(parents=True)
    return {
        "shim delete, nothing left to clean (containerd runs it after every task), dev venv": median_wall(
            [str(SHIM), "-namespace", "ns", "-id", "x", "-bundle", str(bundle), "delete"]
        ),
        "the same, installed layout": median_wall(
            [
                str(installed_bin / "containerd-shim-revenant-v1"),
                "-namespace",
                "ns",
                "-id",
                "x",
                "-bundle",
                str(bundle),
                "delete",
            ]
        ),
        "installed layout: python -c pass": median_wall([str(installed_bin / "python"), "-c", "pass"]),
        "python -c pass (venv interpreter start)": median_wall([str(VENV_PY), "-c", "pass"]),
        "python -S -c pass (no site: without the editable install's import finder)": median_wall(
            [str(VENV_PY), "-S", "-c", "pass"]
        ),
        "shim -v (interpreter + entry point)": median_wall([str(SHIM), "-v"]),
        "import of the server modules": median_wall(
            [str(VENV_PY), "-c", "import shim.daemon.server, shim.task.service, shim.task.events, shim.ttrpc"]
        ),
    }


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
    "cold": "io.containerd.revenant.v1, installed layout, default: a fresh shim per container",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()

    images = build_test_images(Path(tempfile.mkdtemp(prefix="shim-bench-images-")))
    installed_bin = installed_layout()
    nodes: dict[str, ContainerdNode] = {}
    try:
        for name in ("dev", "installed", "cold"):
            node = ContainerdNode(f"bench-{name}")
            if name != "dev":
                node.env["PATH"] = f"{installed_bin}:{SYSTEM_PATH}"
            if name != "cold":
                node.env["REVENANT_SHIM_SHARED"] = "1"
            nodes[name] = node
            node.start()
        image = {name: node.import_image(images.busybox) for name, node in nodes.items()}
        plan = {
            "runc": ("dev", RUNC),
            "revenant": ("dev", REVENANT),
            "installed": ("installed", REVENANT),
            "cold": ("cold", REVENANT),
        }
        for variant, (name, rt) in plan.items():  # warm page cache and snapshots
            time_run(nodes[name], rt, image[name], f"warm-{variant}")
        times: dict[str, list[float]] = {v: [] for v in plan}
        for i in range(args.runs):
            order = list(plan) if i % 2 == 0 else list(reversed(plan))  # noise hits all alike
            for variant in order:
                name, rt = plan[variant]
                times[variant].append(time_run(nodes[name], rt, image[name], f"b{i}-{variant}"))
        memory = {
            "runc": [idle_memory(nodes["dev"], RUNC, image["dev"], n) for n in (1, 10)],
            "installed": [idle_memory(nodes["installed"], REVENANT, image["installed"], n) for n in (1, 10)],
        }
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
    print("\n| shim | idle shims for 1 task | VmRSS / Pss (MiB) | shims for 10 tasks | total VmRSS / Pss (MiB) |")
    print("|---|---|---|---|---|")
    for variant, (one, ten) in memory.items():
        print(
            f"| {VARIANTS[variant]} | {one[0]} | {one[1] / 1024:.1f} / {one[2] / 1024:.1f} "
            f"| {ten[0]} | {ten[1] / 1024:.1f} / {ten[2] / 1024:.1f} |"
        )
    print("\nrevenant start-up parts (median wall, ms):")
    for name, value in parts.items():
        print(f"  {name}: {value * 1e3:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
