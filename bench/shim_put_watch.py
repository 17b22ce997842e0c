"""Watch the shim's staged put during a notice (bench/sweep_bench.py --sizes N ... in the same namespace):
once a second the shim's and SeaweedFS's CPU, MemAvailable and the load;
a py-spy profile of the shim (raw collapsed stacks, per thread) for the whole checkpoint; and a hard-link
copy of the staged dump once CRIU has written it, so bench/s3_put_profile.py --dir --page-images can put
the same bytes outside the shim afterwards.

    REVENANT_TEST_NAMESPACE=rt-x .venv/bin/python bench/shim_put_watch.py --cid s3j2048 --keep /dev/shm/keep --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import cpu_census

TICK = os.sysconf("SC_CLK_TCK")
STAGING = Path("/dev/shm/revenant")


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:13]) / TICK


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _has_fd_under(pid: int, prefix: str) -> bool:
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                    return True
            except OSError:
                pass
    except OSError:
        pass
    return False


def _mem_available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return -1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cid", required=True)
    ap.add_argument("--keep", type=Path, required=True, help="hard-link copy of the staged dump (same tmpfs)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rate", type=int, default=50)
    ap.add_argument(
        "--spy", choices=("none", "idle", "gil"), default="idle",
        help="py-spy record: every thread's stack (idle), only the GIL holder's (gil), or no sampling (none)",
    )  # fmt: skip
    a = ap.parse_args(argv)
    ns = os.environ["REVENANT_TEST_NAMESPACE"]
    a.out.mkdir(parents=True, exist_ok=True)
    log = open(a.out / "samples.jsonl", "w")  # noqa: SIM115 (open for the whole watch)
    before = set(STAGING.iterdir()) if STAGING.exists() else set()
    while True:  # the staging dir (a hashed name: shim.protect.staging.owned_name) appears just before the freeze
        dirs = [d for d in STAGING.iterdir() if d not in before and f"-{a.cid}-" in d.name] if STAGING.exists() else []
        if dirs:
            break
        time.sleep(0.2)
    stage = dirs[0]
    t0 = time.monotonic()
    shim = next(p for p in _pids() if "containerd-shim-revenant" in _cmd(p) and ns in _cmd(p) and a.cid in _cmd(p))
    weed = [p for p in _pids() if "weed" in _cmd(p).split(" ")[0] and f"seaweed-{a.cid[3:]}" in _cmd(p)]
    fifo = os.readlink(f"/proc/{shim}/fd/2")  # the bundle's log FIFO, which containerd reads and re-logs
    ctrd = [p for p in _pids() if p != shim and "containerd" in _cmd(p).split(" ")[0] and _has_fd_under(p, fifo)]
    print(f"staging {stage}, shim {shim}, weed {weed}, containerd {ctrd} (reads {fifo})", flush=True)
    pyspy = str(Path(sys.executable).parent / "py-spy")
    mode = ["--idle"] if a.spy == "idle" else ["--gil"]
    spy = None
    if a.spy != "none":
        spy = subprocess.Popen(
            [pyspy, "record", "-p", str(shim), "--nonblocking", *mode,
             "--threads", "--rate", str(a.rate), "--format", "raw", "-o", str(a.out / f"shim-{a.spy}.raw")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    env = Path(f"/proc/{shim}/environ").read_bytes().split(b"\0")
    keys = (b"THREAD", b"ZSTD", b"OMP", b"PYTHON", b"GOMAXPROCS", b"REVENANT", b"MALLOC")
    shown = " ".join(e.decode(errors="replace") for e in env if any(k in e for k in keys))
    print(f"shim cgroups {cpu_census.cgroups(shim)}; environment: {shown}", flush=True)
    kept = False
    census: cpu_census.Census | None = None
    dumped = False
    c_shim, c_weed, c_ctrd = _cpu(shim), sum(_cpu(p) for p in weed), sum(_cpu(p) for p in ctrd)
    while stage.exists():
        # until the put starts: scanning every process's descriptors each second costs CPU the put would get
        criu = not kept and any("criu" in _cmd(p).split(" ")[0] and _has_fd_under(p, str(stage)) for p in _pids())
        reading = _has_fd_under(shim, str(stage))
        if not kept and not criu and reading:  # CRIU is done and the put reads the dump: keep it
            subprocess.run(["cp", "-al", str(stage), str(a.keep)], check=False)
            kept = True
            census, put_t0 = cpu_census.Census(shim, roots={os.getppid()}).start(), time.monotonic()
        if census and not dumped and time.monotonic() - put_t0 > 5:  # the threads mid-put, native frames
            with open(a.out / "dump.txt", "w") as f:
                subprocess.run(
                    [pyspy, "dump", "--native", "--locals", "-p", str(shim)], stdout=f, stderr=f, check=False
                )
            dumped = True
        s, w, k = _cpu(shim), sum(_cpu(p) for p in weed), sum(_cpu(p) for p in ctrd)
        rec = {
            "t": round(time.monotonic() - t0, 2), "shim_cpu": round(s - c_shim, 2), "weed_cpu": round(w - c_weed, 2),
            "containerd_cpu": round(k - c_ctrd, 2),
            "criu": criu, "kept": kept, "mem_avail_mib": _mem_available_mib(),
            "load": os.getloadavg()[0], "shim_threads": len(os.listdir(f"/proc/{shim}/task")) if _cpu(shim) else 0,
        }  # fmt: skip
        log.write(json.dumps(rec) + "\n")
        log.flush()
        c_shim, c_weed, c_ctrd = s, w, k
        time.sleep(1.0)
    print(f"staging gone after {time.monotonic() - t0:.1f} s", flush=True)
    if census is not None:
        text = f"shim's put (CRIU done -> staging gone): {census.stop()}"
        print(text, flush=True)
        (a.out / "census.txt").write_text(text + "\n")
    if spy is not None:
        spy.send_signal(2)  # py-spy writes its profile on SIGINT
        spy.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
