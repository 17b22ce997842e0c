"""Replication lag: how long after its commit on the primary (S3, SeaweedFS) a checkpoint is on a replica.

    .venv/bin/python -m bench.replication_bench [--size MIB] [--replicas file,oci,az]

The dump is bench.store_bench's CRIU-like one (half random, a quarter zero, a quarter repetitive).
Per replica kind, into a fresh store each:
  1. put of the full dump into the S3 primary (the commit the job waits for; replicas do not add to it)
  2. lag of that checkpoint: from the commit to the replica's commit, through the shim's Replicator
     (queue, raw copy of the missing chunk objects, each verified, then the manifest)
  3. baseline: what a copy costs without raw copying: get from the primary (decode + verify) into a
     directory, then put that directory into the replica (re-chunk, re-hash, re-compress)
  4. 5% of the pages rewritten, second put, then the lag of that incremental checkpoint
Prints a markdown table; exit status 0 (it is a measurement).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.store_bench import make_dump, mutate, seaweed_volumes, timed  # noqa: E402
from shim.store import open_store  # noqa: E402
from shim.store.replication import Replicator  # noqa: E402

KEY = "bench/job/main"


def _lag(primary: str, replica: str, seq: int) -> tuple[float, object]:
    rep = Replicator(open_store)
    t = time.perf_counter()
    rep.submit(primary, [replica], KEY, seq)
    if not rep.wait_idle(3600) or not rep.results:
        raise RuntimeError(f"replication to {replica} did not finish")
    lag = time.perf_counter() - t
    rep.close()
    return lag, rep.results[-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="dump size in MiB (default 1024)")
    ap.add_argument("--replicas", default="file", help="comma-separated: file, oci, az (default file)")
    ap.add_argument("--work", type=Path, help="work directory (default: a temporary one)")
    args = ap.parse_args(argv)

    from tests.harness.servers import S3_ACCESS_KEY, S3_SECRET_KEY, Registry, SeaweedS3

    os.environ.setdefault("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
    work = Path(tempfile.mkdtemp(prefix="revenant-repl-bench-", dir=args.work))
    dump = work / "dump"
    make_dump(dump, args.size)
    dump_bytes = sum(p.stat().st_size for p in dump.iterdir())
    mb = dump_bytes / 1e6
    (work / "s3").mkdir()
    # The primary takes a full put and an incremental one (at most another full one) per replica kind.
    s3 = SeaweedS3(work / "s3", volume_max=seaweed_volumes(dump_bytes, puts=2 * len(args.replicas.split(","))))
    s3.start()
    registry = azurite = None
    rows: list[tuple[str, str, str]] = []
    try:
        for kind in args.replicas.split(","):
            primary = f"s3://revenant-test/bench-{kind}?endpoint={s3.endpoint}"
            if kind == "file":
                replica, baseline_target = f"file://{work}/replica", f"file://{work}/baseline"
            elif kind == "oci":
                if registry is None:
                    (work / "registry").mkdir()
                    registry = Registry(work / "registry")
                    registry.start()
                replica = f"oci://127.0.0.1:{registry.port}/bench-replica?insecure=1"
                baseline_target = f"oci://127.0.0.1:{registry.port}/bench-baseline?insecure=1"
            elif kind == "az":
                if azurite is None:
                    from tests.harness.servers import AZ_ACCOUNT, AZ_CONTAINER, Azurite

                    (work / "azurite").mkdir()
                    azurite = Azurite(work / "azurite")
                    os.environ.setdefault("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
                    azurite.start()
                base = f"az://{AZ_ACCOUNT}/{AZ_CONTAINER}"
                replica = f"{base}/bench-replica?endpoint={azurite.endpoint}"
                baseline_target = f"{base}/bench-baseline?endpoint={azurite.endpoint}"
            else:
                raise SystemExit(f"unknown replica kind {kind!r}")
            with open_store(primary) as p:
                t_put, info = timed(lambda p=p: p.put(KEY, dump))
            lag, result = _lag(primary, replica, info.seq)
            rows.append(
                (
                    f"S3 -> {kind}: put of {mb:.0f} MB into S3 (the commit)",
                    f"{t_put:.1f} s ({mb / t_put:.0f} MB/s, {info.bytes_uploaded / 1e6:.0f} MB stored)",
                    "",
                )
            )
            rows.append(
                (
                    f"S3 -> {kind}: replication lag of seq {info.seq} (raw copy)",
                    f"{lag:.1f} s ({result.bytes_copied / 1e6:.0f} MB in {result.chunks_copied} chunks, "
                    f"{result.bytes_copied / 1e6 / lag:.0f} MB/s stored bytes)",
                    f"{lag / t_put:.2f}x the put",
                )
            )
            # The get restores the dump itself (every chunk verified): it replaces the dump, so that the
            # shared VM's disk holds one 4 GiB tree at a time, not two.
            restored = work / f"restored-{kind}"
            shutil.rmtree(dump)
            t0 = time.perf_counter()
            with open_store(primary) as p, open_store(baseline_target) as b:
                p.get(KEY, restored)
                b.put(KEY, restored)
            t_base = time.perf_counter() - t0
            restored.rename(dump)
            if baseline_target.startswith("file://"):
                shutil.rmtree(baseline_target.removeprefix("file://"))
            rows.append(
                (
                    f"S3 -> {kind}: baseline get + re-put",
                    f"{t_base:.1f} s",
                    f"raw copy {lag / t_base:.2f}x of it",
                )
            )
            changed = mutate(dump / "pages-1.img", 0.05, 16)
            with open_store(primary) as p:
                t_put2, info2 = timed(lambda p=p: p.put(KEY, dump))
            lag2, result2 = _lag(primary, replica, info2.seq)
            rows.append(
                (
                    f"S3 -> {kind}: 5% rewritten ({changed / 1e6:.0f} MB): put / replication lag",
                    f"put {t_put2:.1f} s / lag {lag2:.1f} s ({result2.bytes_copied / 1e6:.0f} MB copied, "
                    f"{result2.chunks_present} chunks already there)",
                    f"{lag2 / lag:.2f}x the full copy",
                )
            )
            shutil.rmtree(dump)  # the next replica kind starts from the same first dump
            make_dump(dump, args.size)
    finally:
        s3.shutdown()
        if registry is not None:
            registry.stop()
        if azurite is not None:
            azurite.stop()
        shutil.rmtree(work, ignore_errors=True)
        # Also after a failure: the rows measured before it still count.
        print(f"\n| {args.size} MiB dump | time | ratio |\n|---|---|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
