"""A CPU stand-in for torch_job.py (same command line, same log format) for a dry run of gpu_check.py
without a GPU: it holds a fake NVIDIA device file open (the fake libcuda then treats it as a CUDA
process) and trains nothing: its "loss" is a hash of a deterministic, mutating in-memory state."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

from torch_job import log_line  # same log discipline: never hold the log open


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--log", required=True)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--gib", type=float, default=0.0625)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--step-sleep", type=float, default=0.02)
    args = p.parse_args()
    device = os.environ["STANDIN_DEVICE"]
    fd = os.open(device, os.O_RDWR)  # noqa: F841 - held open: this is what makes us a "CUDA process"
    size = int(args.gib * (1 << 30))
    state = bytearray(hashlib.sha256(str(args.seed).encode()).digest() * (size // 32))
    log_line(args.log, f"start pid={os.getpid()} device=standin state_bytes={len(state)}")
    for step in range(args.steps):
        off = (step * 4096 * 7) % (len(state) - 4096)
        h = hashlib.sha256(state[off : off + 4096]).digest()
        state[off : off + 32] = h
        log_line(args.log, f"step={step} loss={float(int.from_bytes(h[:6], 'big')).hex()}")
        time.sleep(args.step_sleep)
    log_line(args.log, f"done steps={args.steps} checksum={hashlib.sha256(state).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
