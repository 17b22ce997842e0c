"""Snapshotter benchmark: revenant vs containerd's built-in overlayfs, side by side.

1. Prepare+Commit latency through containerd's Snapshots service (the path ctr/CRI/the shim use).
2. Image unpack time (`ctr images import --snapshotter X`) of a multi-layer image.
3. Writable-layer capture and restore throughput for a layer of mixed files.

    .venv/bin/python bench/snapshotter_bench.py [--iterations 200] [--layer-mib 256] [--unpack-runs 3]

Runs a private containerd and revenant-snapshotter under a temp dir (root needed: overlay mounts).
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from harness.containerd import ContainerdNode  # noqa: E402
from harness.layered_image import build_image  # noqa: E402
from harness.snapshotter_proc import SnapshotterProcess, containerd_snapshots  # noqa: E402
from harness.wait import wait_until  # noqa: E402
from revenant_pb.containerd.services.snapshots.v1 import snapshots_pb2 as pb  # noqa: E402
from shim.layer import (  # noqa: E402
    apply_writable_layer,
    capture_writable_layer,
    checkpoint_writable_layer,
    restore_writable_layer,
)

SNAPSHOTTERS = ("overlayfs", "revenant")
MIB = 1 << 20
# containerd garbage-collects snapshots nothing references; this label keeps ours.
KEEP = {"containerd.io/gc.root": "bench"}


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def bench_prepare_commit(node: ContainerdNode, iterations: int) -> dict[str, dict[str, float]]:
    out = {}
    with containerd_snapshots(node.address, node.namespace) as (stub, md):
        for sn in SNAPSHOTTERS:
            stub.Prepare(pb.PrepareSnapshotRequest(snapshotter=sn, key="bench-base-a", labels=KEEP), metadata=md)
            stub.Commit(
                pb.CommitSnapshotRequest(snapshotter=sn, name="bench-base", key="bench-base-a", labels=KEEP),
                metadata=md,
            )
            lat = []
            for i in range(iterations):
                t0 = time.perf_counter()
                stub.Prepare(
                    pb.PrepareSnapshotRequest(snapshotter=sn, key=f"a{i}", parent="bench-base", labels=KEEP),
                    metadata=md,
                )
                stub.Commit(
                    pb.CommitSnapshotRequest(snapshotter=sn, name=f"c{i}", key=f"a{i}", labels=KEEP), metadata=md
                )
                lat.append((time.perf_counter() - t0) * 1000)
            for i in range(iterations):
                stub.Remove(pb.RemoveSnapshotRequest(snapshotter=sn, key=f"c{i}"), metadata=md)
            stub.Remove(pb.RemoveSnapshotRequest(snapshotter=sn, key="bench-base"), metadata=md)
            out[sn] = {"mean_ms": statistics.mean(lat), "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95)}
    return out


def build_unpack_image(out: Path, files: int, big_mib: int) -> Path:
    """The layered test image plus a layer of many small files and one of a few big ones."""
    base = build_image(out.parent / "base.tar")
    rng = random.Random(1)
    layers = []
    for kind in ("small", "big"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            if kind == "small":
                for i in range(files):
                    data = rng.randbytes(rng.randint(100, 16_000))
                    ti = tarfile.TarInfo(f"usr/share/small/{i // 100:03d}/f{i:05d}")
                    ti.size, ti.mode = len(data), 0o644
                    tf.addfile(ti, io.BytesIO(data))
            else:
                for i in range(4):
                    data = rng.randbytes(big_mib * MIB // 4)
                    ti = tarfile.TarInfo(f"opt/big/blob{i}")
                    ti.size, ti.mode = len(data), 0o644
                    tf.addfile(ti, io.BytesIO(data))
        layers.append(buf.getvalue())
    return _append_layers(base, layers, out)


def _append_layers(base: Path, layers: list[bytes], out: Path) -> Path:
    import hashlib
    import json

    with tarfile.open(base) as tf:
        files = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}  # type: ignore[union-attr]
    index = json.loads(files["index.json"])
    mdesc = index["manifests"][0]
    manifest = json.loads(files["blobs/sha256/" + mdesc["digest"].split(":")[1]])
    config = json.loads(files["blobs/sha256/" + manifest["config"]["digest"].split(":")[1]])

    def put(data: bytes) -> str:
        d = hashlib.sha256(data).hexdigest()
        files["blobs/sha256/" + d] = data
        return "sha256:" + d

    for layer in layers:
        manifest["layers"].append(
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": put(layer), "size": len(layer)}
        )
        config["rootfs"]["diff_ids"].append("sha256:" + hashlib.sha256(layer).hexdigest())
    cbytes = json.dumps(config).encode()
    manifest["config"] = {**manifest["config"], "digest": put(cbytes), "size": len(cbytes)}
    mbytes = json.dumps(manifest).encode()
    ref = "localhost/revenant/snapbench:unpack"
    index["manifests"] = [
        {**mdesc, "digest": put(mbytes), "size": len(mbytes), "annotations": {"org.opencontainers.image.ref.name": ref}}
    ]
    files["index.json"] = json.dumps(index).encode()
    with tarfile.open(out, "w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return out


def bench_unpack(node: ContainerdNode, image: Path, runs: int, revenant_root: Path) -> dict[str, dict[str, float]]:
    """`ctr images import --snapshotter X` with the content already in containerd: the tar is read
    again (the same for both) and the layers are unpacked. `none` = import --no-unpack, the floor."""
    node.ctr("images", "import", "--no-unpack", str(image), timeout=600)  # content in, nothing unpacked
    results: dict[str, list[float]] = {sn: [] for sn in ("none", *SNAPSHOTTERS)}
    for _ in range(runs):
        for sn in results:  # interleaved, so drift in the machine hits all alike
            subprocess.run(["sync"], check=True)
            args = ["--no-unpack"] if sn == "none" else ["--snapshotter", sn]
            t0 = time.perf_counter()
            node.ctr("images", "import", *args, str(image), timeout=600)
            subprocess.run(["sync"], check=True)
            results[sn].append(time.perf_counter() - t0)
            if sn != "none":
                _remove_all_snapshots(node, sn)
                _wait_backend_empty(node, sn, revenant_root)
    return {sn: {"median_s": statistics.median(v), "min_s": min(v)} for sn, v in results.items()}


def _remove_all_snapshots(node: ContainerdNode, sn: str) -> None:
    """Remove the unpacked chain leaf-first (ctr images rm would drop the content too)."""
    for _ in range(50):
        rows = [r.split() for r in node.ctr("snapshots", "--snapshotter", sn, "ls").stdout.splitlines()[1:]]
        if not rows:
            return
        parents = {r[1] for r in rows if len(r) == 3}
        for r in rows:
            if r[0] not in parents:  # containerd's GC may beat us to it: no check
                node.ctr("snapshots", "--snapshotter", sn, "rm", r[0], check=False)
    raise RuntimeError(f"{sn}: snapshots left after removal: {rows}")


def _wait_backend_empty(node: ContainerdNode, sn: str, revenant_root: Path, timeout: float = 120) -> None:
    """containerd removes backend snapshots in its GC, after `ctr snapshots rm` returns: wait for
    the backend's directories to be gone, so one run's deletions do not slow the next run."""
    snapdir = (
        node.root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots"
        if sn == "overlayfs"
        else revenant_root / "snapshots"
    )
    wait_until(
        lambda: not any(snapdir.iterdir()),
        timeout,
        f"{sn}'s backend snapshots to be removed",
        interval=0.2,
        detail=lambda: f"still there: {sorted(p.name for p in snapdir.iterdir())}",
    )
    subprocess.run(["sync"], check=True)


def make_mixed_layer(upper: Path, total_mib: int, seed: int = 3) -> int:
    """Small, medium and large files, symlinks, hardlinks, a sparse file, a whiteout: ~total_mib of data."""
    rng = random.Random(seed)
    budget = total_mib * MIB
    written = 0
    text = b"".join(f"line {n} of a log a container wrote\n".encode() for n in range(40_000))[:MIB]
    shares = [(0.25, 512, 64 * 1024), (0.35, 256 * 1024, 4 * MIB), (0.40, 32 * MIB, 128 * MIB)]
    for share, lo, hi in shares:
        target = written + int(budget * share)
        i = 0
        while written < target:
            size = min(rng.randint(lo, hi), target - written)
            d = upper / f"d{lo}" / f"{i // 200:03d}"
            d.mkdir(parents=True, exist_ok=True)
            p = d / f"f{i:06d}"
            with open(p, "wb") as f:
                # half the files random (incompressible, no duplicates), half text-like (compressible)
                left = size
                while left > 0:
                    n = min(left, MIB)
                    f.write(os.urandom(n) if i % 2 else text[:n])
                    left -= n
            if i % 50 == 0:
                os.symlink(p.name, d / f"link{i}")
                os.link(p, d / f"hard{i}")
            written += size
            i += 1
    with open(upper / "sparse.img", "wb") as f:
        f.truncate(2 * 1024 * MIB)
        f.seek(MIB)
        f.write(b"x" * MIB)
    os.mknod(upper / "whiteout", 0o020000, os.makedev(0, 0))
    return written


def bench_layer(total_mib: int, work: Path) -> dict[str, float]:
    upper, out, restored, restored2 = work / "upper", work / "captured", work / "restored", work / "restored2"
    for d in (upper, restored, restored2):
        d.mkdir(parents=True)
    data = make_mixed_layer(upper, total_mib)
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    info = capture_writable_layer(upper, out)
    t_cap = time.perf_counter() - t0
    t0 = time.perf_counter()
    apply_writable_layer(out / "rootfs-diff.tar", restored)
    subprocess.run(["sync", "-f", str(restored)], check=True)
    t_res = time.perf_counter() - t0
    # End to end through the store (file:// backend on the same disk): capture + put, get + apply.
    store_url = f"file://{work / 'store'}"
    t0 = time.perf_counter()
    ckpt = checkpoint_writable_layer(upper, store_url, "bench/layer")
    t_put = time.perf_counter() - t0
    t0 = time.perf_counter()
    restore_writable_layer(store_url, "bench/layer", None, restored2)
    subprocess.run(["sync", "-f", str(restored2)], check=True)
    t_get = time.perf_counter() - t0
    stored = sum(f.stat().st_size for f in (work / "store").rglob("*") if f.is_file())
    return {
        "capture_put_s": t_put,
        "capture_put_mib_s": data / MIB / t_put,
        "get_restore_s": t_get,
        "get_restore_mib_s": data / MIB / t_get,
        "stored_mib": stored / MIB,
        "uploaded_mib": ckpt.bytes_uploaded / MIB,
        "data_mib": data / MIB,
        "entries": info.entries,
        "tar_mib": info.size / MIB,
        "capture_s": t_cap,
        "capture_mib_s": data / MIB / t_cap,
        "restore_s": t_res,
        "restore_mib_s": data / MIB / t_res,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=200, help="Prepare+Commit pairs per snapshotter")
    ap.add_argument("--unpack-runs", type=int, default=3)
    ap.add_argument("--unpack-files", type=int, default=5000, help="small files in the unpack image")
    ap.add_argument("--unpack-big-mib", type=int, default=200, help="MiB of big files in the unpack image")
    ap.add_argument("--layer-mib", type=int, default=256, help="data in the mixed writable layer")
    ap.add_argument("--parts", default="pc,unpack,layer", help="comma list of: pc (Prepare+Commit), unpack, layer")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="snapbench-", dir="/var/tmp"))
    node = ContainerdNode("bench")
    # Beside the node's dir, not in it: the harness walks the node dir while tearing it down.
    snap = SnapshotterProcess(node.snapshotter_address, work / "revenant-snapshotter")
    parts = set(args.parts.split(","))
    try:
        snap.start()  # before containerd, whose first dial of the proxy plugin must find it
        node.start()
        version = subprocess.run(["containerd", "--version"], capture_output=True, text=True).stdout.split()[2]
        print(f"# snapshotter bench (containerd {version}, {os.cpu_count()} CPUs)")
        if "pc" in parts:
            _report_prepare_commit(node, args)
        if "unpack" in parts:
            _report_unpack(node, args, work)
        if "layer" in parts:
            _report_layer(args, work)
    finally:
        try:
            node.destroy()  # removes containers through the snapshotter, so it goes first
        finally:
            snap.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _report_prepare_commit(node: ContainerdNode, args: argparse.Namespace) -> None:
    pc = bench_prepare_commit(node, args.iterations)
    print(f"\n## Prepare+Commit through containerd ({args.iterations} pairs)")
    print("| snapshotter | mean ms | p50 ms | p95 ms |\n|---|---|---|---|")
    for sn, r in pc.items():
        print(f"| {sn} | {r['mean_ms']:.2f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} |")
    print(f"ratio revenant/overlayfs (mean): {pc['revenant']['mean_ms'] / pc['overlayfs']['mean_ms']:.2f}x")


def _report_unpack(node: ContainerdNode, args: argparse.Namespace, work: Path) -> None:
    image = build_unpack_image(work / "unpack.tar", args.unpack_files, args.unpack_big_mib)
    up = bench_unpack(node, image, args.unpack_runs, work / "revenant-snapshotter")
    print(
        f"\n## Image unpack ({image.stat().st_size / MIB:.0f} MiB image: busybox layers + {args.unpack_files}"
        f" small files + {args.unpack_big_mib} MiB big files; median of {args.unpack_runs})"
    )
    print("| snapshotter | median s | min s |\n|---|---|---|")
    for sn, r in up.items():  # "none" = import --no-unpack: reading the tar, no unpack
        print(f"| {sn} | {r['median_s']:.2f} | {r['min_s']:.2f} |")
    print(f"ratio revenant/overlayfs (median): {up['revenant']['median_s'] / up['overlayfs']['median_s']:.2f}x")


def _report_layer(args: argparse.Namespace, work: Path) -> None:
    lr = bench_layer(args.layer_mib, work / "layer")
    print(
        f"\n## Writable layer capture/restore ({lr['data_mib']:.0f} MiB mixed data, {lr['entries']} entries,"
        f" plus a 2 GiB sparse file with 1 MiB of data; tar {lr['tar_mib']:.0f} MiB)"
    )
    print("| step | seconds | MiB/s |\n|---|---|---|")
    print(f"| capture (upper dir -> tar) | {lr['capture_s']:.2f} | {lr['capture_mib_s']:.0f} |")
    print(f"| restore (tar -> new upper dir, synced) | {lr['restore_s']:.2f} | {lr['restore_mib_s']:.0f} |")
    print(
        f"| capture + store put (file://, chunk+hash+zstd) | {lr['capture_put_s']:.2f} |"
        f" {lr['capture_put_mib_s']:.0f} |"
    )
    print(f"| store get (verify) + restore, synced | {lr['get_restore_s']:.2f} | {lr['get_restore_mib_s']:.0f} |")
    print(
        f"store holds {lr['stored_mib']:.0f} MiB for {lr['data_mib']:.0f} MiB of data"
        f" (uploaded {lr['uploaded_mib']:.0f} MiB)"
    )


if __name__ == "__main__":
    sys.exit(main())
