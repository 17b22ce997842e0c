"""Behaviour of the checkpoint store, every test on the file, S3 (SeaweedFS), gs:// (the same SeaweedFS through
the GCS backend), Azure (Azurite) and OCI (registry) backends."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from harness.servers import SERVER_FIXTURES
from harness.store_util import (
    MIB,
    chunks_only_in,
    corrupt_chunk,
    make_tree,
    mutate,
    newest_name,
    tree_digest,
    truncate_manifest,
)
from shim.store import (
    BackendUnavailable,
    CheckpointNotFound,
    ChunkCorrupt,
    Chunker,
    StoreError,
    open_store,
)
from shim.store.backends.base import TransientError

KEY = "default/mypod/main"
# "file" packs chunks into pack files (the default); "file-loose" keeps one file per chunk (?packs=0).
BACKENDS = ["file", "file-loose", "s3", "gs", "az", "oci"]
ROOT = Path(__file__).resolve().parents[2]


class Target:
    def __init__(self, url: str, server=None) -> None:
        self.url = url
        self.server = server


@pytest.fixture(params=BACKENDS)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    if request.param == "file":
        return Target(f"file://{tmp_path}/store")
    if request.param == "file-loose":
        return Target(f"file://{tmp_path}/store?packs=0")
    srv = request.getfixturevalue(SERVER_FIXTURES[request.param])
    return Target(srv.url, srv)


def restore(store, tmp_path: Path, name: str, **kw):
    dest = tmp_path / name
    info = store.get(KEY, dest, **kw)
    return info, dest


@pytest.mark.parametrize("chunker", ["fixed:65536", "fastcdc:16384"])
def test_round_trip_odd_files(target: Target, tmp_path: Path, chunker: str) -> None:
    src = make_tree(tmp_path / "src", seed=1)
    store = open_store(target.url, chunker=Chunker.parse(chunker))
    progress: list[tuple[int, int]] = []
    info = store.put(KEY, src, metadata={"runtime": "runc 1.1.5"}, progress=lambda d, t: progress.append((d, t)))
    assert info.seq == 1 and info.parent is None and info.metadata == {"runtime": "runc 1.1.5"}
    assert info.files == 7 and info.chunks_new > 0 and progress[-1][0] == progress[-1][1]
    got, dest = restore(store, tmp_path, "dest")
    assert got.seq == 1
    assert tree_digest(dest) == tree_digest(src)
    sparse = os.stat(dest / "sparse.img")
    assert sparse.st_size == 64 * MIB and sparse.st_blocks * 512 < 1 * MIB, "holes were filled"
    assert os.stat(dest / "empty.img").st_size == 0
    assert store.verify() == []
    assert [i.seq for i in store.list(KEY)] == [1]
    assert store.latest(KEY, verify=True).seq == 1
    assert store.latest("no/such/key") is None
    with pytest.raises(CheckpointNotFound):
        store.get("no/such/key", tmp_path / "nothing")


def test_round_trip_large(target: Target, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "pages-1.img", "wb") as f:  # 96 MiB: half random, half repetitive
        for i in range(24):
            f.write(os.urandom(2 * MIB))
            f.write((b"%016d" % i) * (2 * MIB // 16))
    # Tiny thresholds so the manifest goes up as an S3 multipart upload / OCI chunked (PATCH) upload, and
    # Azure packs as staged blocks.
    url = target.url + ("&multipart_mb=0.1" if target.url.startswith(("s3", "gs")) else "")
    url += "&block_mb=1" if url.startswith("az") else ""
    url += "&chunked_mb=0.05" if url.startswith("oci") else ""
    store = open_store(url)
    info = store.put(KEY, src)
    assert info.bytes_read == 96 * MIB
    assert info.bytes_uploaded < 0.6 * info.bytes_read  # repetitive half compresses
    _, dest = restore(store, tmp_path, "dest")
    assert tree_digest(dest) == tree_digest(src)


def test_dedup_across_checkpoints(target: Target, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", seed=2, big_mib=32)
    store = open_store(target.url)
    first = store.put(KEY, src)
    mutate(src / "pages-1.img", 0.05, seed=3)
    second = store.put(KEY, src)
    assert second.seq == 2 and second.parent == 1
    # 1.6 MB of pages rewritten in 25 runs; each run dirties ~2 content-defined chunks.
    assert second.bytes_uploaded < 0.25 * first.bytes_uploaded, (first, second)
    assert second.chunks_new < 0.25 * second.chunks_total and second.dedup_ratio > 5
    _, dest = restore(store, tmp_path, "dest")
    assert tree_digest(dest) == tree_digest(src)
    old, dest1 = restore(store, tmp_path, "dest1", seq=1)
    assert old.seq == 1 and (dest1 / "pages-1.img").read_bytes() != (src / "pages-1.img").read_bytes()


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from shim.store import open_store
    print("start", flush=True)
    open_store(sys.argv[2]).put(sys.argv[3], Path(sys.argv[4]))
    print("done", flush=True)
""")


def test_crash_mid_put(target: Target, tmp_path: Path) -> None:
    v1 = make_tree(tmp_path / "v1", seed=4)
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "pages-1.img").write_bytes(os.urandom(48 * MIB))
    store = open_store(target.url)
    store.put(KEY, v1)
    rng = random.Random()
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(ROOT), target.url, KEY, str(v2)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout.readline().strip() == "start"
            time.sleep(rng.uniform(0.05, 1.5))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    infos = store.list(KEY)
    assert infos[0].seq == 1
    for info in infos:  # a kill after the commit leaves a complete seq 2: that is fine too
        dest = tmp_path / f"r{info.seq}"
        store.get(KEY, dest, seq=info.seq)
        assert tree_digest(dest) == tree_digest(v1 if info.seq == 1 else v2)
    assert store.verify() == []
    after = store.put(KEY, v2)  # the store stays usable (stale locks of the dead writers ignored)
    assert after.seq == infos[-1].seq + 1


@pytest.mark.parametrize("backend", ["s3", "gs", "az", "oci"])
def test_server_down_mid_upload(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    srv = request.getfixturevalue(SERVER_FIXTURES[backend])
    v1 = make_tree(tmp_path / "v1", seed=5)
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "pages-1.img").write_bytes(os.urandom(24 * MIB))
    store = open_store(srv.url)
    store.put(KEY, v1)
    store.backend.retries, store.backend.backoff = 3, 0.1
    stopped = threading.Event()

    def stop_midway(done: int, total: int) -> None:
        if done > total // 4 and not stopped.is_set():
            stopped.set()
            srv.stop()

    with pytest.raises(BackendUnavailable, match="failed after 3 attempts"):
        store.put(KEY, v2, progress=stop_midway)
    assert stopped.is_set()
    srv.start()
    fresh = open_store(srv.url)
    assert [i.seq for i in fresh.list(KEY)] == [1], "a failed put must commit nothing"
    _, dest = restore(fresh, tmp_path, "dest")
    assert tree_digest(dest) == tree_digest(v1)
    assert fresh.verify() == []
    # Retry with backoff rides out a short outage.
    fresh.backend.retries, fresh.backend.backoff = 12, 0.5
    srv.stop()
    timer = threading.Timer(1.0, srv.start)
    timer.start()
    try:
        info = fresh.put(KEY, v2)
    finally:
        timer.join()
    assert info.seq == 2
    _, dest2 = restore(fresh, tmp_path, "dest2")
    assert tree_digest(dest2) == tree_digest(v2)


def test_flipped_byte_detected_and_fallback(target: Target, tmp_path: Path) -> None:
    v1 = make_tree(tmp_path / "v1", seed=6)
    store = open_store(target.url)
    store.put(KEY, v1)
    name1 = newest_name(store, KEY)
    v2 = make_tree(tmp_path / "v2", seed=7)
    store.put(KEY, v2)
    name2 = newest_name(store, KEY)
    bad = chunks_only_in(store, KEY, name2, name1)[0]
    corrupt_chunk(store, target.server, bad)
    fresh = open_store(target.url)
    problems = fresh.verify()
    assert problems and all(bad in p and "seq 2" in p for p in problems), problems
    with pytest.raises(ChunkCorrupt, match=bad):
        fresh.get(KEY, tmp_path / "strict", fallback=False)
    assert not (tmp_path / "strict").exists(), "nothing unverified may reach the restore"
    info, dest = restore(fresh, tmp_path, "dest")
    assert info.seq == 1 and tree_digest(dest) == tree_digest(v1)
    assert fresh.latest(KEY).seq == 2 and fresh.latest(KEY, verify=True).seq == 1


def test_truncated_manifest_detected_and_fallback(target: Target, tmp_path: Path) -> None:
    v1 = make_tree(tmp_path / "v1", seed=8)
    store = open_store(target.url)
    store.put(KEY, v1)
    store.put(KEY, make_tree(tmp_path / "v2", seed=9))
    truncate_manifest(store, KEY, newest_name(store, KEY))
    fresh = open_store(target.url)
    problems = fresh.verify()
    assert len(problems) == 1 and "seq 2" in problems[0] and "manifest" in problems[0], problems
    info, dest = restore(fresh, tmp_path, "dest")
    assert info.seq == 1 and tree_digest(dest) == tree_digest(v1)
    with pytest.raises(StoreError, match="manifest"):
        fresh.get(KEY, tmp_path / "strict", fallback=False)
    assert [i.seq for i in fresh.list(KEY)] == [1]


def test_two_writers_one_key(target: Target, tmp_path: Path) -> None:
    trees = {
        (w, r): make_tree(tmp_path / f"w{w}r{r}", seed=100 + 10 * w + r, big_mib=2) for w in range(2) for r in range(2)
    }
    results: list = []
    errors: list = []

    def writer(w: int) -> None:
        store = open_store(target.url)
        try:
            for r in range(2):
                results.append((w, r, store.put(KEY, trees[(w, r)], metadata={"w": w, "r": r})))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    store = open_store(target.url)
    listed = {i.seq: i for i in store.list(KEY)}
    # Seqs are unique and ordered; a writer that lost a race moves up, which can leave gaps.
    assert len(results) == 4 and sorted(listed) == sorted(info.seq for _, _, info in results)
    for w, r, info in results:
        assert listed[info.seq].metadata == {"w": w, "r": r}
        dest = tmp_path / f"get{info.seq}"
        store.get(KEY, dest, seq=info.seq)
        assert tree_digest(dest) == tree_digest(trees[(w, r)])
    assert store.verify() == []


@pytest.mark.parametrize("target", [b for b in BACKENDS if b != "oci"], indirect=True)
def test_has_chunk_sees_chunks_another_writer_stored(target: Target, tmp_path: Path) -> None:
    """A store opened before another writer's put answers has_chunk for that put's chunks (pack stores used to
    answer from the pack indexes they had read so far: False for a chunk packed since). Not oci://: its index
    is every checkpoint manifest, read once per process; a put dedups against it chunk by chunk."""
    reader = open_store(target.url)
    reader.backend.has_chunk("0" * 64)  # reads whatever indexes exist now
    open_store(target.url).put(KEY, make_tree(tmp_path / "t", seed=12, big_mib=1))
    digests = open_store(target.url)._load(KEY, newest_name(reader, KEY)).chunk_digests()
    assert digests and all(reader.backend.has_chunk(d) for d in digests)
    assert not reader.backend.has_chunk("0" * 64)


def test_gc_racing_put(target: Target, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", seed=11, big_mib=8)
    store = open_store(target.url)
    store.put(KEY, src)
    stop = threading.Event()
    runs: list[dict] = []
    errors: list = []

    def collector() -> None:
        gc_store = open_store(target.url)
        while not stop.is_set():
            try:
                gc_store.prune(KEY, keep=2)
                runs.append(gc_store.gc(grace_seconds=0))
            except TransientError:
                # docker-registry answers an occasional manifest GET with HTTP 500 under load: gc must
                # then stop without deleting anything still referenced, which the verify and restore below prove.
                continue
            except Exception as e:
                errors.append(e)
                return

    t = threading.Thread(target=collector)
    t.start()
    try:
        for i in range(4):
            mutate(src / "pages-1.img", 0.2, seed=20 + i)
            store.put(KEY, src)
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert runs
    assert store.verify() == []
    _, dest = restore(store, tmp_path, "dest")
    assert tree_digest(dest) == tree_digest(src)
    # With no writer left, GC removes what the pruned checkpoints alone used (file and S3 list chunks).
    store.prune(KEY, keep=1)
    stats = store.gc(grace_seconds=0)
    assert "skipped" not in stats
    if not target.url.startswith("oci://"):
        assert stats["chunks_deleted"] > 0
    assert store.verify() == [] and [i.seq for i in store.list(KEY)] == [5]
    fresh = open_store(target.url)  # another process's view after gc rewrote packs
    assert fresh.verify() == []
    _, dest2 = restore(fresh, tmp_path, "dest2")
    assert tree_digest(dest2) == tree_digest(src)


def test_delete_and_prune(target: Target, tmp_path: Path) -> None:
    store = open_store(target.url)
    for s in range(3):
        store.put(KEY, make_tree(tmp_path / f"t{s}", seed=30 + s, big_mib=1))
    store.put("other/key", tmp_path / "t0")
    store.delete(KEY, 2)
    assert [i.seq for i in store.list(KEY)] == [1, 3]
    with pytest.raises(CheckpointNotFound):
        store.delete(KEY, 2)
    assert store.prune(KEY, keep=1) == [1]
    assert [(i.key, i.seq) for i in store.list()] == [("default/mypod/main", 3), ("other/key", 1)]


def test_disk_full_local(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "revenant-test", str(mnt)], check=True)
    try:
        url = f"file://{mnt}/store"
        store = open_store(url)
        v1 = make_tree(tmp_path / "v1", seed=40, big_mib=2)
        store.put(KEY, v1)
        big = tmp_path / "big"
        big.mkdir()
        (big / "pages-1.img").write_bytes(os.urandom(24 * MIB))
        with pytest.raises(StoreError, match="no space"):
            store.put(KEY, big)
        assert [i.seq for i in store.list(KEY)] == [1]
        shutil.rmtree(mnt / "store" / "tmp")  # whatever the failed put left half-written
        _, dest = restore(store, tmp_path, "dest")
        assert tree_digest(dest) == tree_digest(v1)
        assert store.verify() == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_cli_round_trip(target: Target, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", seed=50)
    exe = str(Path(sys.executable).parent / "revenant")

    def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([exe, "store", *args], capture_output=True, text=True, timeout=120)
        if check:
            assert p.returncode == 0, p.stderr
        return p

    out = cli("put", "--store", target.url, "--key", KEY, str(src)).stdout
    assert "seq 1" in out and "uploaded" in out and "dedup ratio" in out
    put = json.loads(cli("put", "--store", target.url, "--key", KEY, "--json", str(src)).stdout)
    assert put["seq"] == 2 and put["bytes_uploaded"] == 0 and put["parent"] == 1
    listed = json.loads(cli("ls", "--store", target.url, "--json").stdout)
    assert [(i["key"], i["seq"]) for i in listed] == [(KEY, 1), (KEY, 2)]
    assert "default/mypod/main" in cli("ls", "--store", target.url, "--key", KEY).stdout
    got = json.loads(
        cli("get", "--store", target.url, "--key", KEY, "--seq", "1", "--json", str(tmp_path / "dest")).stdout
    )
    assert got["seq"] == 1 and tree_digest(tmp_path / "dest") == tree_digest(src)
    assert json.loads(cli("verify", "--store", target.url, "--json").stdout) == {"ok": True, "problems": []}
    gc = json.loads(cli("gc", "--store", target.url, "--keep", "1", "--grace", "0", "--json").stdout)
    assert gc["pruned"] == {KEY: [1]}
    bad = cli("get", "--store", target.url, "--key", "missing", str(tmp_path / "x"), check=False)
    assert bad.returncode == 1 and "no committed checkpoint" in bad.stderr


def test_oci_push_heals_a_blob_link_a_registry_crash_left_empty(oci_registry, tmp_path: Path) -> None:
    """distribution answers HTTP 500 for a blob whose link file a crash (mid-upload) left empty; pushing
    the blob again rewrites the link, so a put must push rather than retry the HEAD until it gives up."""
    data = os.urandom(100_000)
    digest = hashlib.sha256(data).hexdigest()
    url = oci_registry.url + "&packs=0"  # one blob per chunk: the blob is pushed again
    open_store(url).backend.put_chunk(digest, data)
    repo = oci_registry.url.split("?")[0].rsplit("/", 1)[1]
    links = list((oci_registry.server.root / "data").glob(f"docker/registry/v2/repositories/{repo}/_layers/*/*/link"))
    assert links, "the registry stored no blob link where the test expects it"
    for link in links:
        link.write_bytes(b"")
    backend = open_store(url).backend
    backend.retries = 2
    backend.put_chunk(digest, data)
    assert backend.get_chunk(digest) == data


def test_oci_artifacts_listed_by_registry_tools(oci_registry, tmp_path: Path) -> None:
    store = open_store(oci_registry.url + "&chunked_mb=0.05")  # chunks > 50 KiB go up in PATCH pieces
    info = store.put(KEY, make_tree(tmp_path / "src", seed=60, big_mib=4))
    base = oci_registry.url.split("?")[0].replace("oci://", "http://", 1)
    host, repo = base.rsplit("/", 1)
    tags = json.load(urllib.request.urlopen(f"{host}/v2/{repo}/tags/list"))["tags"]
    prefix = "default_mypod_main."
    assert any(t.startswith(prefix) and t.endswith(info.name) for t in tags), tags
    latest = next(t for t in tags if t.startswith(prefix) and t.endswith(".latest"))
    req = urllib.request.Request(
        f"{host}/v2/{repo}/manifests/{latest}", headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}
    )
    doc = json.load(urllib.request.urlopen(req))
    assert doc["artifactType"] == "application/vnd.revenant.checkpoint.v1"
    assert doc["annotations"]["io.revenant.checkpoint.key"] == KEY
    # A second repository mounts the blobs it shares instead of uploading them again.
    other = oci_registry.url.replace(repo, repo + "-b") + f"&mount_from={repo}"
    assert open_store(other).put(KEY, tmp_path / "src").seq == 1
