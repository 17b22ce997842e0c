"""ctr-compatible checkpoint and restore through revenant's shim, on harness containerd nodes.

The user's tools only: `ctr container checkpoint --task --rw` makes a checkpoint image (CRIU images,
the writable layer, the spec), `ctr containers restore --live --rw` brings it back as a new container.
Every restore is proved by the memjob: one continuous run past the checkpoint, the checksum the host
replay computes, and a full-memory verification.
"""

from __future__ import annotations

from urllib.parse import urlparse

from harness.containerd import ContainerdNode

from .util import assert_resumed, ctr, last_step, remove, run_memjob

SEED = 11


def test_checkpoint_and_restore_512mib(node_factory, test_images):
    """ctr checkpoint/restore through the revenant shim: a memjob with 512 MiB of state, checkpointed by ctr
    and restored after its task and container are gone."""
    mib = 512
    node = node_factory("a")
    image = node.import_image(test_images.memjob)
    log = run_memjob(node, image, "ck-big", mib, SEED)
    ref = "localhost/checkpoint/big:1"
    ctr(node, "container", "checkpoint", "--task", "--rw", "ck-big", ref)
    at = last_step(log)
    remove(node, "ck-big")
    ctr(node, "containers", "restore", "--live", "--rw", "ck-big2", ref)
    assert_resumed(node, "ck-big2", test_images.memjob_binary, mib, SEED, at)
    # containerd never removes the directory it unpacked the checkpoint into; the shim does, once linked.
    assert not list(node.xdg_runtime_dir.glob("ctrd-checkpoint*"))


def _checkpoint_on(node: ContainerdNode, image: str, cid: str, ref: str, mib: int) -> int:
    log = run_memjob(node, image, cid, mib, SEED)
    ctr(node, "container", "checkpoint", "--task", "--rw", cid, ref)
    return last_step(log)


def test_move_between_nodes_by_export_and_by_registry(node_factory, test_images, oci_registry, tmp_path):
    """Checkpoint on node A; A is destroyed; B restores from an exported archive, C from the registry.

    containerd 1.6's export fails on the checkpoint's proto blobs unless --skip-manifest-json;
    import must not unpack (a checkpoint index is no runnable image). `ctr images push --plain-http`
    pushes the checkpoint's non-standard media types as they are; `ctr images pull` of it fails in 1.6
    (it warns "reference for unknown type" for the checkpoint blobs and then tries to unpack), while
    `ctr content fetch --plain-http` fetches the index with every blob and records the image."""
    mib = 64
    registry = urlparse(oci_registry.url)
    ref = f"{registry.netloc}{registry.path}/moved:1"
    a = node_factory("a")
    at = _checkpoint_on(a, a.import_image(test_images.memjob), "ck-job", ref, mib)
    archive = tmp_path / "checkpoint.tar"
    ctr(a, "images", "export", "--skip-manifest-json", str(archive), ref)
    ctr(a, "images", "push", "--plain-http", ref)
    a.destroy()  # node A is gone before anyone restores

    b = node_factory("b")
    b.import_image(test_images.memjob)  # the base image is there already, as on any node that ran it
    ctr(b, "images", "import", "--no-unpack", str(archive))
    ctr(b, "containers", "restore", "--live", "--rw", "ck-job", ref)
    assert_resumed(b, "ck-job", test_images.memjob_binary, mib, SEED, at)
    b.destroy()

    c = node_factory("c")
    c.import_image(test_images.memjob)
    ctr(c, "content", "fetch", "--plain-http", ref)
    ctr(c, "containers", "restore", "--live", "--rw", "ck-job", ref)
    assert_resumed(c, "ck-job", test_images.memjob_binary, mib, SEED, at)
