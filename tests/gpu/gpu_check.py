"""The GPU check (CUDA state through the driver's checkpoint API + CRIU on real hardware), driven by
tests/gpu/run_on_gpu.sh on a GPU machine (never in CI).

Flow (all through shim.gpu, the module the checkpoint engine uses):
  0. probes: the real driver's answer for a non-CUDA pid, and for a lock that times out
  1. reference: torch_job.py runs N steps uninterrupted
  2. same job, same seed: at step K, GpuCoordinator.quiesced() locks + checkpoints its CUDA state,
     `criu dump --leave-running` dumps the process tree, session.after_dump(leave_running=True) restores
     + unlocks, the job trains on a few steps (the leave-running path), then it is SIGKILLed
  3. `criu restore --restore-detached` brings the tree back (CUDA state CHECKPOINTED),
     GpuCoordinator.resume_restored() restores + unlocks it, the job runs to N
  4. every logged (step, loss) of run 2/3 must equal the reference's bit for bit, and the final
     parameter/optimizer/table checksum must match.
The container path (containerd + runc + the revenant shim) is NOT used: the GPU machine has no containerd,
runc or package registry, and the shim's task service is not finished; this runs the same GPU module
around a plain CRIU dump/restore of the process tree instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness.wait import wait_until
from shim.gpu import CudaError, GpuCoordinator, find_cuda_processes
from shim.gpu.coordinator import _call_with_deadline
from shim.gpu.discovery import start_time
from shim.libc import set_child_subreaper

HERE = Path(__file__).resolve().parent
STARTED: list[int] = []  # every pid this script started or restored; killed on the way out
CHILDREN: dict[int, subprocess.Popen[bytes]] = {}  # kept so subprocess never reaps them behind our back


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


PID_FILE: Path | None = None  # run_on_gpu.sh kills these if this script itself is killed


def started(pid: int) -> None:
    STARTED.append(pid)
    if PID_FILE:
        with open(PID_FILE, "a") as f:
            f.write(f"{pid}\n")


def kill_all() -> None:
    for pid in STARTED:
        if start_time(pid) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for pid in STARTED:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def start_job(py: str, log: Path, args: argparse.Namespace) -> int:
    """The job in its own session (CRIU dumps a tree that owns its session), stdio on /dev/null."""
    cmd = [
        py,
        str(HERE / args.job),
        "--log",
        str(log),
        "--steps",
        str(args.steps),
        "--gib",
        str(args.gib),
        "--seed",
        str(args.seed),
        "--step-sleep",
        str(args.step_sleep),
    ]
    p = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    started(p.pid)
    CHILDREN[p.pid] = p
    return p.pid


def read_log(log: Path) -> tuple[dict[int, list[str]], str | None, list[str]]:
    steps: dict[int, list[str]] = {}
    checksum = None
    errors = []
    if not log.exists():
        return steps, None, []
    for line in log.read_text().splitlines():
        if m := re.fullmatch(r"step=(\d+) loss=(\S+)", line):
            steps.setdefault(int(m[1]), []).append(m[2])
        elif m := re.fullmatch(r"done steps=\d+ checksum=(\w+)", line):
            checksum = m[1]
        elif line.startswith("error"):
            errors.append(line)
    return steps, checksum, errors


def wait_for(cond, timeout_s: float, what: str, pid: int, log: Path) -> None:
    """Until cond holds, giving up at once if the job `pid` exits (its log tail in the error)."""
    wait_until(
        cond,
        timeout_s,
        what,
        interval=0.05,
        abort=lambda: f"job {pid} exited" if start_time(pid) is None else None,
        detail=lambda: f"log tail: {log.read_text()[-2000:] if log.exists() else ''}",
    )


def wait_exit(pid: int, timeout_s: float) -> int | None:
    """Exit status of a child (or of a restored process reparented to us as subreaper)."""
    child = CHILDREN.pop(pid, None)
    if child is not None:
        return child.wait(timeout_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.1)
    raise TimeoutError(f"pid {pid} still running after {timeout_s} s")


def last_step(log: Path) -> int:
    steps, _, _ = read_log(log)
    return max(steps) if steps else -1


def criu(args: argparse.Namespace, *cmd: str) -> float:
    t0 = time.monotonic()
    res = subprocess.run([args.criu, *cmd], capture_output=True, text=True, timeout=300)
    dt = time.monotonic() - t0
    if res.returncode != 0:
        log_file = next((cmd[i + 1] for i, c in enumerate(cmd) if c == "-o"), None)
        work = next((cmd[i + 1] for i, c in enumerate(cmd) if c == "-D"), ".")
        tail = ""
        if log_file and (Path(work) / log_file).exists():
            tail = "\n".join((Path(work) / log_file).read_text().splitlines()[-40:])
        raise RuntimeError(f"criu {cmd[0]} failed ({res.returncode}): {res.stderr}\n{tail}")
    return dt


CRIU_OPTS = ["--ghost-limit", "256M", "--link-remap", "--ext-unix-sk", "--file-locks"]


def probes(coord: GpuCoordinator, py: str) -> dict[str, Any]:
    """Facts the fake libcuda assumes; recorded, not asserted."""
    out: dict[str, Any] = {}
    drv = coord.driver()
    sleeper = subprocess.Popen(["sleep", "60"])
    started(sleeper.pid)
    try:
        st = _call_with_deadline("get_state", sleeper.pid, lambda: drv.get_state(sleeper.pid), 20)
        out["get_state_non_cuda"] = f"state {st!r}"
    except CudaError as e:
        out["get_state_non_cuda"] = f"{e.name} ({e.code})"
    except Exception as e:  # the watchdog
        out["get_state_non_cuda"] = f"{type(e).__name__}: {e}"
    sleeper.kill()
    sleeper.wait()
    # A kernel that spins ~4 s: a lock with a 300 ms timeout cannot complete while it runs.
    spin = subprocess.Popen(
        [
            py,
            "-c",
            "import torch,sys; torch.cuda.init(); x=torch.zeros(1,device='cuda');"
            "print('ready',flush=True); torch.cuda._sleep(int(4e9)); torch.cuda.synchronize();"
            "sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    started(spin.pid)
    try:
        assert spin.stdout is not None
        spin.stdout.readline()
        out["get_state_cuda"] = repr(drv.get_state(spin.pid))
        t0 = time.monotonic()
        try:
            _call_with_deadline("lock", spin.pid, lambda: drv.lock(spin.pid, 300), 20)
            out["lock_timeout"] = f"lock returned SUCCESS after {time.monotonic() - t0:.2f} s (no timeout)"
            drv.unlock(spin.pid)
        except CudaError as e:
            out["lock_timeout"] = (
                f"{e.name} ({e.code}) after {time.monotonic() - t0:.2f} s, state after: {drv.get_state(spin.pid)!r}"
            )
        except Exception as e:  # the watchdog: the driver did not honour timeoutMs
            out["lock_timeout"] = f"{type(e).__name__}: {e}"
    finally:
        spin.kill()
        spin.wait()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--criu", required=True)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--checkpoint-at", type=int, default=150)
    ap.add_argument("--run-on", type=int, default=30, help="steps the job makes after the leave-running dump")
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--step-sleep", type=float, default=0.02)
    ap.add_argument("--no-probes", action="store_true")
    ap.add_argument("--job", default="torch_job.py")
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU rehearsal with the fake libcuda and standin_job.py: after criu restore, mark the "
        "pid CHECKPOINTED in the fake (the real driver carries that state inside the process)",
    )
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    global PID_FILE
    PID_FILE = args.work / "pids"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated (timeout)"))  # so `finally` kills the jobs
    set_child_subreaper()  # restored jobs become our children
    result: dict[str, Any] = {"ok": False}
    coord = GpuCoordinator(lock_timeout_ms=30_000)
    try:
        ok, reason = coord.available()
        if not ok:
            raise RuntimeError(reason)
        result["node"] = coord.node_info()
        say(f"node: {json.dumps(result['node'])}")
        if not args.no_probes and not args.dry_run:
            result["probes"] = probes(coord, args.python)
            say(f"probes: {result['probes']}")

        ref_log = args.work / "reference.log"
        t0 = time.monotonic()
        pid = start_job(args.python, ref_log, args)
        wait_for(lambda: last_step(ref_log) >= 0, 180, "the reference's first step", pid, ref_log)
        # What a restart costs before the first step: process start, CUDA init, model and state setup.
        result["restart_to_first_step_s"] = round(time.monotonic() - t0, 3)
        code = wait_exit(pid, 240)
        result["reference_s"] = round(time.monotonic() - t0, 3)  # process start + CUDA init + N steps
        ref_steps, ref_sum, errs = read_log(ref_log)
        if code != 0 or errs or ref_sum is None:
            raise RuntimeError(f"reference run failed ({code}): {errs or ref_log.read_text()[-2000:]}")
        say(f"reference: {len(ref_steps)} steps in {result['reference_s']} s, checksum {ref_sum}")

        log = args.work / "checkpointed.log"
        pid = start_job(args.python, log, args)
        wait_for(lambda: last_step(log) >= args.checkpoint_at, 180, f"step {args.checkpoint_at}", pid, log)
        found = [p.pid for p in find_cuda_processes([pid])]
        if found != [pid]:
            raise RuntimeError(f"discovery via /dev/nvidia* found {found}, expected [{pid}]")
        img = args.work / "img"
        img.mkdir(exist_ok=True)
        stall0 = time.monotonic()
        with coord.quiesced([pid]) as session:
            at_step = last_step(log)
            dump_s = criu(
                args, "dump", "-t", str(pid), "-D", str(img), "-o", "dump.log", "-v4", "--leave-running", *CRIU_OPTS
            )
            session.after_dump(leave_running=True)
        stall = time.monotonic() - stall0
        result["checkpoint"] = {
            "at_step": at_step,
            "criu_dump_s": round(dump_s, 3),
            "stall_s": round(stall, 3),
            "image_bytes": sum(f.stat().st_size for f in img.iterdir()),
            "gpu": session.metadata(),
        }
        say(f"checkpoint at step {at_step}: {json.dumps(result['checkpoint'])}")
        target = at_step + args.run_on
        wait_for(lambda: last_step(log) >= target, 120, f"step {target} after the leave-running dump", pid, log)
        os.kill(pid, signal.SIGKILL)  # the spot node goes away
        wait_exit(pid, 60)
        say(f"killed the job at step {last_step(log)}")

        t0 = time.monotonic()
        restore_s = criu(args, "restore", "-D", str(img), "-o", "restore.log", "-v4", "--restore-detached", *CRIU_OPTS)
        if start_time(pid) is None:
            raise RuntimeError(f"criu restore returned but pid {pid} is not running")
        if args.dry_run:
            Path(os.environ["FAKE_CUDA_STATE_DIR"], f"state.{pid}").write_text("checkpointed\n")
        resumed = coord.resume_restored([pid], expected=1)
        result["restore"] = {
            "criu_restore_s": round(restore_s, 3),
            "gpu": resumed,
            "total_s": round(time.monotonic() - t0, 3),
        }
        say(f"restored: {json.dumps(result['restore'], default=str)}")
        code = wait_exit(pid, 240)
        steps, checksum, errs = read_log(log)
        mismatches = [(s, v, ref_steps.get(s)) for s, vs in steps.items() for v in vs if [v] != ref_steps.get(s)]
        missing = sorted(set(ref_steps) - set(steps))
        result.update(
            exit_code=code,
            checksum=checksum,
            reference_checksum=ref_sum,
            errors=errs,
            mismatches=mismatches[:20],
            missing_steps=missing[:20],
            replayed_steps=sorted(s for s, vs in steps.items() if len(vs) > 1),
        )
        result["ok"] = code == 0 and not errs and not mismatches and not missing and checksum == ref_sum
        say(
            f"trajectory: {len(steps)} steps, {len(result['replayed_steps'])} replayed after restore, "
            f"{len(mismatches)} mismatches, {len(missing)} missing; checksum "
            f"{'MATCHES' if checksum == ref_sum else f'DIFFERS {checksum} != {ref_sum}'}"
        )
    except BaseException as e:
        result["error"] = f"{type(e).__name__}: {e}"
        say(f"FAILED: {result['error']}")
    finally:
        kill_all()
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
        for name in ("dump.log", "restore.log"):
            f = args.work / "img" / name
            if f.exists():
                (args.out / f"criu-{name}").write_text(f.read_text()[-4_000_000:])
    say(("PASS" if result["ok"] else "FAIL") + f" (details in {args.out / 'gpu_check.json'})")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
