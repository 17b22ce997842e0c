"""ttrpc micro-benchmark: unary round-trip latency and throughput over a unix socket.

Pairs measured (each in its own process, as in production):
  python-client -> python-server   our Client against our Server (echo handler) in a child process
  python-client -> go-runc-shim    our Client against a stock containerd-shim-runc-v2 (`State`)
  python-client -> go-containerd   our Client against containerd's ttrpc socket (`Events/Forward`)
The Go peers need containerd, runc and busybox-static (the test harness starts a private containerd).

Run:  .venv/bin/python bench/ttrpc_bench.py [--calls 3000] [--no-go]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from google.protobuf import empty_pb2, wrappers_pb2

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the test harness starts private containerd nodes

from revenant_pb.containerd.services.events.ttrpc.v1 import events_pb2  # noqa: E402
from revenant_pb.testing import taskprobe_pb2  # noqa: E402
from shim.ttrpc import NAMESPACE_KEY, Client  # noqa: E402

ECHO_SERVER = """
import socket, sys
from google.protobuf import wrappers_pb2
from shim.ttrpc import Server, Service
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.bind(sys.argv[1]); s.listen(64)
print("ready", flush=True)
Server([Service("bench.Echo", {"Echo": (wrappers_pb2.BytesValue, lambda ctx, req: req)})]).serve(s)
"""

Call = Callable[[], object]


def latency(call: Call, n: int) -> dict[str, float]:
    for _ in range(min(200, n)):  # warm up
        call()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return {
        "p50_us": samples[len(samples) // 2] * 1e6,
        "p99_us": samples[int(len(samples) * 0.99)] * 1e6,
        "mean_us": statistics.fmean(samples) * 1e6,
    }


def throughput(call: Call, threads: int, n_per_thread: int) -> float:
    barrier = threading.Barrier(threads + 1)

    def worker() -> None:
        barrier.wait()
        for _ in range(n_per_thread):
            call()

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in pool:
        t.join()
    return threads * n_per_thread / (time.perf_counter() - t0)


def report(pair: str, what: str, call: Call, calls: int) -> list[str]:
    lat = latency(call, calls)
    tput1 = throughput(call, 1, calls)
    tput8 = throughput(call, 8, max(1, calls // 8))
    line = f"| {pair} | {what} | {lat['p50_us']:.0f} | {lat['p99_us']:.0f} | {tput1:.0f} | {tput8:.0f} |"
    print(line, flush=True)
    return [line]


def bench_python(calls: int) -> list[str]:
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ttrpc-bench-") as d:
        path = os.path.join(d, "echo.sock")
        proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, path], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            with Client(f"unix://{path}") as client:
                for size, label in ((16, "echo 16 B"), (64 << 10, "echo 64 KiB"), (1 << 20, "echo 1 MiB")):
                    req = wrappers_pb2.BytesValue(value=os.urandom(size))
                    n = calls if size <= 65536 else max(50, calls // 20)
                    rows += report(
                        "python -> python",
                        label,
                        lambda req=req: client.call("bench.Echo", "Echo", req, wrappers_pb2.BytesValue),
                        n,
                    )
        finally:
            proc.kill()
            proc.wait()
    return rows


def bench_go(calls: int) -> list[str]:
    from harness.containerd import ContainerdNode
    from harness.images import build_test_images

    rows: list[str] = []
    images_dir = Path(tempfile.mkdtemp(prefix="ttrpc-bench-img-"))
    node = ContainerdNode("bench")
    try:
        node.start()
        image = node.import_image(build_test_images(images_dir).busybox)
        cid = f"bench-{uuid.uuid4().hex[:8]}"
        node.ctr("run", "-d", "--runc-root", str(node.runc_root), image, cid, "sleep", "600")
        md = {NAMESPACE_KEY: node.namespace}
        address = (node.bundle(cid) / "address").read_text().strip()
        with Client(address) as shim:
            req = taskprobe_pb2.StateRequest(id=cid)
            rows += report(
                "python -> go runc shim",
                "Task/State",
                lambda: shim.call("containerd.task.v2.Task", "State", req, taskprobe_pb2.StateResponse, metadata=md),
                calls,
            )
        with Client(f"unix://{node.ttrpc_address}") as cd:
            env = events_pb2.Envelope(namespace=node.namespace, topic="/bench/ttrpc")
            env.event.type_url = "containerd.events.TaskExit"
            env.timestamp.GetCurrentTime()
            fwd = events_pb2.ForwardRequest(envelope=env)
            rows += report(
                "python -> go containerd",
                "Events/Forward",
                lambda: cd.call(
                    "containerd.services.events.ttrpc.v1.Events", "Forward", fwd, empty_pb2.Empty, metadata=md
                ),
                calls,
            )
    finally:
        node.destroy()
        subprocess.run(["rm", "-rf", str(images_dir)], check=False)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=3000, help="calls per latency / single-thread run")
    ap.add_argument("--no-go", action="store_true", help="skip the Go peers (no containerd needed)")
    args = ap.parse_args()
    print(
        f"# {platform.node()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print("| pair | call | p50 latency (us) | p99 latency (us) | calls/s, 1 thread | calls/s, 8 threads |")
    print("|---|---|---|---|---|---|")
    bench_python(args.calls)
    if not args.no_go:
        bench_go(args.calls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
