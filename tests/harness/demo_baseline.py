"""`make demo` until the transparent-protection demo lands: a live memjob moved between two
private containerd nodes with the stock runc shim and ctr's checkpoint/restore, with a timeline.

Run as: PYTHONPATH=tests python -m harness.demo_baseline
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from .containerd import ContainerdNode
from .images import build_test_images
from .memjob import LOG_IN_CONTAINER, expected_checksum, memjob_args, read_steps, wait_for_step

MIB, SEED = 256, 7
REF = "localhost/revenant/checkpoint:demo"
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.2f}s] {msg}", flush=True)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="rv-demo-"))
    say("building test images (busybox + memjob)")
    images = build_test_images(work / "images")
    node_a, node_b = ContainerdNode("a"), ContainerdNode("b")
    try:
        node_a.start()
        node_b.start()
        say(f"node A containerd at {node_a.address}; node B at {node_b.address}")
        image = node_a.import_image(images.memjob)
        node_a.ctr("run", "-d", "--runc-root", str(node_a.runc_root), image, "job", *memjob_args(MIB, SEED))
        log_a = node_a.rootfs("job") / LOG_IN_CONTAINER.lstrip("/")
        say(f"job running on node A with {MIB} MiB of state in memory")
        wait_for_step(log_a, 5)
        say(f"job at step {read_steps(log_a)[-1].n}; checkpointing (ctr container checkpoint --task --rw)")
        t = time.monotonic()
        node_a.ctr("containers", "checkpoint", "--task", "--rw", "job", REF, timeout=600)
        checkpoint_s = time.monotonic() - t
        archive = work / "checkpoint.tar"
        node_a.ctr("images", "export", "--skip-manifest-json", str(archive), REF, timeout=600)
        steps_on_a = read_steps(log_a)[-1].n
        say(f"checkpoint taken in {checkpoint_s:.2f}s ({archive.stat().st_size / 2**20:.0f} MiB); "
            "destroying node A")
        node_a.destroy()
        t = time.monotonic()
        node_b.import_image(images.memjob)
        node_b.import_image(archive, "--no-unpack")
        node_b.ctr("containers", "restore", "--live", "--rw", "job", REF, timeout=600)
        restore_s = time.monotonic() - t
        log_b = node_b.rootfs("job") / LOG_IN_CONTAINER.lstrip("/")
        resumed_from = read_steps(log_b)[-1].n
        say(f"restored on node B in {restore_s:.2f}s, from step {resumed_from}")
        steps = wait_for_step(log_b, resumed_from + 5)
        last = steps[-1]
        ok = last.checksum == expected_checksum(images.memjob_binary, MIB, SEED, last.n)
        verdict = "matches" if ok else "DIFFERS from"
        say(f"job at step {last.n} on node B; memory checksum {verdict} the reference")
        print("\nsummary")
        print(f"  steps done on node A        {steps_on_a}")
        print(f"  resumed on node B from step {resumed_from}")
        print(f"  steps lost                  {steps_on_a - resumed_from}")
        print(f"  checkpoint (ctr, runc shim) {checkpoint_s:.2f}s")
        print(f"  import + restore on node B  {restore_s:.2f}s")
        print(f"  memory verified             {'yes' if ok else 'NO'}")
        print("\n(baseline with the stock runc shim; revenant's own demo replaces this once the shim lands)")
        return 0 if ok else 1
    finally:
        node_a.destroy()
        node_b.destroy()


if __name__ == "__main__":
    sys.exit(main())
