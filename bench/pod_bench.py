"""Pod benchmark: Kubernetes pods through CRI with runtime handler `revenant` vs `runc`, side by side on
one private containerd with CRI (the kubelet's calls, driven by tests/harness/cri.py).

* pod start: RunPodSandbox + CreateContainer + StartContainer until ContainerStatus says RUNNING, median
  (p10, p90) of N runs, the two handlers interleaved so machine noise hits both alike; teardown untimed;
* idle memory per pod: resident memory (VmRSS and PSS) of the shims serving K idle one-container pods,
  per pod (one shim per pod for both handlers).

A pod under `revenant` is protected by default (key <namespace>/<pod>/<container>; here with no
periodic checkpoints, as a node without a checkpoint_interval has): its Create looks the key up in the
node's store, which is part of what is measured.

  .venv/bin/python bench/pod_bench.py --runs 15 --pods 5 --containerd 1.6
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from bench.shimprocs import rss_pss_kib, shim_pids  # noqa: E402
from harness.containerd import CRI_NAMESPACE, ContainerdNode  # noqa: E402
from harness.cri import RUNNING, ContainerSpec, CriClient, PodSpec  # noqa: E402
from harness.images import BUSYBOX_REF, build_pause_image, build_test_images  # noqa: E402

HANDLERS = ("runc", "revenant")
SHIM_BINARIES = {"runc": b"containerd-shim-runc-v2", "revenant": b"containerd-shim-revenant-v1"}


def start_pod(cri: CriClient, name: str, handler: str, logs: Path) -> tuple[str, float]:
    pod = PodSpec(name=name, log_directory=str(logs / name))
    spec = ContainerSpec("main", BUSYBOX_REF, command=["sleep", "1000"])
    t0 = time.perf_counter()
    pod_id = cri.run_pod(pod, handler)
    cid = cri.create_container(pod_id, pod, spec)
    cri.start_container(cid)
    while cri.status(cid).state != RUNNING:
        time.sleep(0.005)
    return pod_id, time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10, help="pod starts per handler")
    ap.add_argument("--pods", type=int, default=4, help="idle pods per handler for the memory figure")
    ap.add_argument("--containerd", choices=("1.6", "1.7"), default="1.6")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pod-bench-"))
    images = build_test_images(work / "images")
    pause = build_pause_image(work / "images")
    node = ContainerdNode("bench", cri=True, version=args.containerd, subnet="10.231.250.0/24")
    node.write_revenant_config(extra=f'store = "file://{work / "store"}"')
    node.start()
    try:
        for archive in (pause, images.busybox):
            node.ctr("images", "import", str(archive), namespace=CRI_NAMESPACE, timeout=300)
        logs = node.dir / "pod-logs"
        with CriClient(node.cri_address) as cri:
            start_pod(cri, "warm-runc", "runc", logs)  # first pod pays image and CNI set-up
            start_pod(cri, "warm-revenant", "revenant", logs)
            cri.remove_all_pods()
            times: dict[str, list[float]] = {h: [] for h in HANDLERS}
            for i in range(args.runs):
                for handler in HANDLERS if i % 2 == 0 else HANDLERS[::-1]:
                    pod_id, took = start_pod(cri, f"s-{handler}-{i}", handler, logs)
                    times[handler].append(took)
                    cri.teardown_pod(pod_id)
            print(
                f"pod start (RunPodSandbox + CreateContainer + StartContainer -> RUNNING), containerd "
                f"{args.containerd}, {args.runs} runs each:"
            )
            for h in HANDLERS:
                t = times[h]
                print(
                    f"  {h:9} median {statistics.median(t) * 1000:7.0f} ms   p10 {pct(t, 0.1) * 1000:6.0f}"
                    f"   p90 {pct(t, 0.9) * 1000:6.0f}"
                )
            ratio = statistics.median(times["revenant"]) / statistics.median(times["runc"])
            print(f"  ratio revenant/runc: {ratio:.2f}x (target <= 1.3x)")

            print(f"idle memory, {args.pods} one-container pods per handler (shim processes only):")
            per_pod = {}
            for h in HANDLERS:
                ids = [start_pod(cri, f"idle-{h}-{i}", h, logs)[0] for i in range(args.pods)]
                time.sleep(3.0)  # let start-up garbage settle
                pids = shim_pids(node.address, SHIM_BINARIES[h])
                rss = pss = 0
                for pid in pids:
                    r, p = rss_pss_kib(pid)
                    rss, pss = rss + r, pss + p
                per_pod[h] = (rss / args.pods / 1024, pss / args.pods / 1024)
                print(
                    f"  {h:9} {len(pids)} shims; per pod: VmRSS {per_pod[h][0]:5.1f} MiB, PSS {per_pod[h][1]:5.1f} MiB"
                )
                for pod_id in ids:
                    cri.teardown_pod(pod_id)
            print(
                f"  revenant per pod: {per_pod['revenant'][0]:.1f} MiB RSS (target <= 30 MiB), "
                f"{per_pod['revenant'][0] / per_pod['runc'][0]:.1f}x runc's"
            )
    except BaseException:
        node.destroy(keep_logs_in=work)  # the node's containerd (and shim) log, for the failure
        print(f"failed; containerd's log is kept in {work}", file=sys.stderr)
        raise
    node.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
