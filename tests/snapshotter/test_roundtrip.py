"""A container's writable layer crosses nodes: captured on node A, restored by Prepare on node B.

The restore goes the way the shim will use it: containerd's own Snapshots service with a
`containerd.io/snapshot/revenant.io/restore-from` label (containerd forwards only labels under
`containerd.io/snapshot/` to a proxy snapshotter), the data in a real store (file:// backend).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from harness.containerd import ContainerdNode
from harness.snapshotter_proc import RevenantNode, containerd_snapshots, wait_containerd_reaches
from harness.tree_listing import diff_listings, tree_listing
from revenant_pb.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from shim.layer import (
    LAYER_FILE,
    LAYER_INFO,
    checkpoint_writable_layer,
    restore_writable_layer_into_mounts,
    sha256_file,
)
from snapshotter.overlay import LABEL_RESTORE_FROM, LABEL_STORE

CKPT_KEY = "revenant-test/job/main"

CONTAINER_SCRIPT = """
set -e
rm /data/delete-me.txt
mv /data/rename-me.txt /data/renamed.txt
rm -r /data/replace-dir && mkdir /data/replace-dir && echo new > /data/replace-dir/new.txt
echo added > /data/sub/added.txt
mkdir -p /srv/app/deep && echo secret > /srv/app/deep/owned.txt
chown 1234:5678 /srv/app/deep/owned.txt && chmod 4750 /srv/app/deep/owned.txt
ln /srv/app/deep/owned.txt /srv/app/hardlink.txt
ln -s ../data/keep.txt /srv/app/rel-link && ln -s /data/keep.txt /srv/app/abs-link
mkfifo /srv/app/fifo
truncate -s 50M /srv/app/sparse.img && echo middle | dd of=/srv/app/sparse.img bs=1 seek=10000000 conv=notrunc
dd if=/dev/urandom of=/srv/app/random.bin bs=1k count=300 2>/dev/null
chmod 0711 /srv/app
echo changed >> /etc/passwd
"""


@contextmanager
def mounted(mounts, target: Path, readonly: bool = False):
    target.mkdir(parents=True, exist_ok=True)
    m = mounts[0]
    opts = list(m.options) + (["ro"] if readonly and m.type == "overlay" else [])
    if m.type == "bind":
        opts = [o for o in opts if o not in ("rw", "ro")] + ["ro" if readonly else "rw"]
    subprocess.run(["mount", "-t", m.type, m.source, str(target), "-o", ",".join(opts)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def top_layer(node: ContainerdNode) -> str:
    rows = [line.split() for line in node.ctr("snapshots", "--snapshotter", "revenant", "ls").stdout.splitlines()[1:]]
    committed = {r[0] for r in rows if r[-1] == "Committed"}
    parents = {r[1] for r in rows if len(r) == 3}
    (top,) = committed - parents
    return top


def snapshot_parent(node: ContainerdNode, key: str, snapshotter: str = "revenant") -> str:
    """The container snapshot's parent: the image's chain ID, what the shim records as `base`."""
    with containerd_snapshots(node.address, node.namespace) as (stub, md):
        return stub.Stat(pb.StatSnapshotRequest(snapshotter=snapshotter, key=key), metadata=md).info.parent


def node_mounts(node: ContainerdNode, key: str):
    with containerd_snapshots(node.address, node.namespace) as (stub, md):
        return list(stub.Mounts(pb.MountsRequest(snapshotter="revenant", key=key), metadata=md).mounts)


def prepare_restored(node: ContainerdNode, key: str, parent: str, labels: dict[str, str], reconnect_s: float = 0):
    """Prepare through containerd. reconnect_s: retry while containerd's gRPC connection to a
    restarted snapshotter is still in its reconnect backoff (it answers UNAVAILABLE meanwhile)."""
    deadline = time.monotonic() + reconnect_s
    with containerd_snapshots(node.address, node.namespace) as (stub, md):
        req = pb.PrepareSnapshotRequest(
            snapshotter="revenant", key=key, parent=parent, labels={"containerd.io/gc.root": "test", **labels}
        )
        while True:
            try:
                return list(stub.Prepare(req, metadata=md).mounts)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def write_container_layer(a: RevenantNode, image: Path, ref: str, tmp: Path) -> dict[str, tuple]:
    node = a.node
    node.ctr("images", "import", "--snapshotter", "revenant", str(image), timeout=300)
    node.ctr(
        "run", "--snapshotter", "revenant", "--runc-root", str(node.runc_root), ref, "job", "sh", "-c", CONTAINER_SCRIPT
    )
    mounts = node_mounts(node, "job")
    # busybox has no setfattr: set xattrs from the host through the container's own overlay.
    with mounted(mounts, tmp / "a-rw") as m:
        os.setxattr(m / "srv/app/random.bin", "user.origin", b"node-a")
        os.setxattr(m / "srv/app/random.bin", "user.bin", bytes(range(200)))
        os.setxattr(m / "data/renamed.txt", "trusted.revenant", b"t")
    with mounted(mounts, tmp / "a-ro", readonly=True) as m:
        return tree_listing(m)


def test_writable_layer_round_trip_across_nodes(
    revenant_node_factory, layered_image: Path, layered_ref: str, tmp_path: Path
) -> None:
    store_url = f"file://{tmp_path / 'store'}"
    a = revenant_node_factory("a")
    b = revenant_node_factory("b")  # no --store: the label names it
    before = write_container_layer(a, layered_image, layered_ref, tmp_path)
    assert "data/delete-me.txt" not in before and "data/replace-dir/old-a.txt" not in before

    base = snapshot_parent(a.node, "job")
    assert base.startswith("sha256:")
    ckpt = checkpoint_writable_layer(node_mounts(a.node, "job"), store_url, CKPT_KEY, metadata={"node": "a"}, base=base)
    a.node.destroy()  # node A is gone

    b.node.ctr("images", "import", "--snapshotter", "revenant", str(layered_image), timeout=300)
    assert top_layer(b.node) == base  # same image, same chain ID on both nodes
    # Onto another base (the image's lower layer) the layer would be wrong: refused, nothing kept.
    lower = next(
        r
        for r in b.node.ctr("snapshots", "--snapshotter", "revenant", "ls").stdout.split()
        if r != base and r.startswith("sha256:")
    )
    with pytest.raises(grpc.RpcError) as e:
        prepare_restored(b.node, "wrong-base", lower, {LABEL_RESTORE_FROM: CKPT_KEY, LABEL_STORE: store_url})
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "different image" in e.value.details()
    mounts = prepare_restored(
        b.node,
        "job-restored",
        top_layer(b.node),
        {LABEL_RESTORE_FROM: f"{CKPT_KEY}@{ckpt.seq}", LABEL_STORE: store_url},
    )
    assert mounts[0].type == "overlay"
    with mounted(mounts, tmp_path / "b-ro", readonly=True) as m:
        after = tree_listing(m)
    assert diff_listings(before, after) == []

    # A container on node B runs on the restored tree.
    with mounted(mounts, tmp_path / "b-rw") as m:
        res = b.node.ctr(
            "run",
            "--rm",
            "--rootfs",
            "--runc-root",
            str(b.node.runc_root),
            "--env",
            "PATH=/bin",
            str(m),
            "probe",
            "/bin/sh",
            "-c",
            "cat /data/renamed.txt /data/replace-dir/new.txt; ls /data/replace-dir;"
            " test -e /data/delete-me.txt || echo deleted; stat -c '%u:%g %a' /srv/app/deep/owned.txt;"
            " tail -1 /etc/passwd",
            check=False,
        )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n") == [
        "the container renames this",
        "new",
        "new.txt",
        "deleted",
        "1234:5678 4750",
        "changed",
        "",
    ]


def test_restore_uses_default_store_and_latest(revenant_node_factory, layered_image, layered_ref, tmp_path) -> None:
    store_url = f"file://{tmp_path / 'store'}"
    a = revenant_node_factory("a")
    before = write_container_layer(a, layered_image, layered_ref, tmp_path)
    checkpoint_writable_layer(node_mounts(a.node, "job"), store_url, CKPT_KEY)
    b = revenant_node_factory("b", store=store_url)  # --store default, no store label, latest seq
    b.node.ctr("images", "import", "--snapshotter", "revenant", str(layered_image), timeout=300)
    mounts = prepare_restored(b.node, "r", top_layer(b.node), {LABEL_RESTORE_FROM: CKPT_KEY})
    with mounted(mounts, tmp_path / "b-ro", readonly=True) as m:
        assert diff_listings(before, tree_listing(m)) == []


def snapshot_dirs(rn: RevenantNode) -> list[str]:
    return sorted(os.listdir(rn.snap_root / "snapshots"))


def test_failed_restore_leaves_nothing(revenant_node_factory, layered_image, tmp_path) -> None:
    store_url = f"file://{tmp_path / 'store'}"
    b = revenant_node_factory("b", store=store_url)
    b.node.ctr("images", "import", "--snapshotter", "revenant", str(layered_image), timeout=300)
    dirs = snapshot_dirs(b)
    with pytest.raises(grpc.RpcError) as e:
        prepare_restored(b.node, "r", top_layer(b.node), {LABEL_RESTORE_FROM: "no/such/key"})
    assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value
    assert snapshot_dirs(b) == dirs
    assert "r" not in b.node.ctr("snapshots", "--snapshotter", "revenant", "ls").stdout


def hostile_checkpoint(tmp: Path, store_url: str, key: str) -> None:
    """A checkpoint whose layer (with a correct digest) tries to write outside the snapshot."""
    src = tmp / "hostile-src"
    src.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ok = tarfile.TarInfo("ok.txt")
        ok.size = 3
        tf.addfile(ok, io.BytesIO(b"ok\n"))
        evil = tarfile.TarInfo("../../../../../../tmp/revenant-escape.txt")
        evil.size = 4
        tf.addfile(evil, io.BytesIO(b"evil"))
    (src / LAYER_FILE).write_bytes(buf.getvalue())
    digest = sha256_file(src / LAYER_FILE)
    (src / LAYER_INFO).write_text(json.dumps({"sha256": digest}))
    from shim.store import open_store

    with open_store(store_url) as store:
        store.put(key, src, metadata={})


def test_hostile_checkpoint_rejected_through_containerd(revenant_node_factory, layered_image, tmp_path) -> None:
    store_url = f"file://{tmp_path / 'store'}"
    hostile_checkpoint(tmp_path, store_url, "evil/key")
    b = revenant_node_factory("b", store=store_url)
    b.node.ctr("images", "import", "--snapshotter", "revenant", str(layered_image), timeout=300)
    dirs = snapshot_dirs(b)
    with pytest.raises(grpc.RpcError) as e:
        prepare_restored(b.node, "r", top_layer(b.node), {LABEL_RESTORE_FROM: "evil/key"})
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'..' in path" in e.value.details()
    assert not Path("/tmp/revenant-escape.txt").exists()
    assert snapshot_dirs(b) == dirs


def test_sigkill_during_restore_leaves_no_half_layer(
    revenant_node_factory, layered_image, layered_ref, tmp_path
) -> None:
    store_url = f"file://{tmp_path / 'store'}"
    a = revenant_node_factory("a")
    before = write_container_layer(a, layered_image, layered_ref, tmp_path)
    checkpoint_writable_layer(node_mounts(a.node, "job"), store_url, CKPT_KEY)
    b = revenant_node_factory("b", store=store_url)
    b.node.ctr("images", "import", "--snapshotter", "revenant", str(layered_image), timeout=300)
    parent = top_layer(b.node)
    dirs = snapshot_dirs(b)
    b.snapshotter.restart(env={"REVENANT_SNAPSHOTTER_CRASH_AT": "restore-mid-apply"})
    wait_containerd_reaches(b.node, parent)
    with pytest.raises(grpc.RpcError):
        prepare_restored(b.node, "r", parent, {LABEL_RESTORE_FROM: CKPT_KEY})
    assert b.snapshotter.wait_dead() == -9
    b.snapshotter.start()  # startup removes the half-built new-* directory
    wait_containerd_reaches(b.node, parent)
    assert snapshot_dirs(b) == dirs
    # containerd's own record of the failed Prepare is gone too; the retry restores everything.
    mounts = prepare_restored(b.node, "r", parent, {LABEL_RESTORE_FROM: CKPT_KEY}, reconnect_s=0)
    with mounted(mounts, tmp_path / "b-ro", readonly=True) as m:
        assert diff_listings(before, tree_listing(m)) == []


@pytest.mark.parametrize("snapshotter", ["revenant", "overlayfs"])
def test_shim_path_restores_into_prepared_rootfs(
    revenant_node_factory, layered_image, layered_ref, tmp_path, snapshotter: str
) -> None:
    """No label (CRI, `ctr run`): the shim fills the fresh rootfs's upper dir from the checkpoint."""
    store_url = f"file://{tmp_path / 'store'}"
    a = revenant_node_factory("a")
    before = write_container_layer(a, layered_image, layered_ref, tmp_path)
    checkpoint_writable_layer(node_mounts(a.node, "job"), store_url, CKPT_KEY)
    b = revenant_node_factory("b")
    b.node.ctr("images", "import", "--snapshotter", snapshotter, str(layered_image), timeout=300)
    b.node.ctr("containers", "create", "--snapshotter", snapshotter, layered_ref, "job", "sh")
    with containerd_snapshots(b.node.address, b.node.namespace) as (stub, md):
        mounts = list(stub.Mounts(pb.MountsRequest(snapshotter=snapshotter, key="job"), metadata=md).mounts)
    restore_writable_layer_into_mounts(mounts, store_url, CKPT_KEY)
    with pytest.raises(Exception, match="not empty"):
        restore_writable_layer_into_mounts(mounts, store_url, CKPT_KEY)
    with mounted(mounts, tmp_path / "b-ro", readonly=True) as m:
        assert diff_listings(before, tree_listing(m)) == []
