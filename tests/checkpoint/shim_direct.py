"""Talking to revenant's shim on its own ttrpc socket, as containerd does, for what ctr 1.6 cannot ask.

containerd 1.6's ctr sets CheckpointOptions (--exit, --image-path, --work-path) only for containers of
the io.containerd.runc.v1/v2 runtimes (ctr's withCheckpointOpts); for any other runtime it silently
makes a checkpoint image and leaves the task running. containerd reads a restore directory
(runc Options.criu_image_path) likewise only for its runc runtimes (services/tasks getRestorePath), and
ctr has no flag to create a task from a directory. The client's Task.Checkpoint also pauses the task
and resumes it afterwards, so a task the user paused comes out of `ctr task checkpoint` running.
These helpers send Task/Create with `checkpoint=DIR`, Task/Checkpoint etc. straight to a shim.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
from pathlib import Path

from harness.containerd import ContainerdNode
from revenant_pb.containerd.runc.v1 import oci_pb2
from revenant_pb.containerd.task.v2 import shim_pb2 as api
from revenant_pb.containerd.types import mount_pb2
from shim.ttrpc import NAMESPACE_KEY, Client, ServiceClient

from .util import container_spec, ctr

TASK = api.DESCRIPTOR.services_by_name["Task"]


class Shim:
    """A revenant shim of `node`, reached through the `address` file in a bundle it serves."""

    def __init__(self, node: ContainerdNode, serving: str) -> None:
        self.node = node
        self.address = (node.bundle(serving) / "address").read_text().strip()

    def call(self, method: str, request, timeout: float = 120):
        with Client(self.address, timeout=timeout) as client:
            task = ServiceClient(client, TASK, {NAMESPACE_KEY: self.node.namespace})
            return getattr(task, method)(request, timeout=timeout)

    def checkpoint(self, cid: str, image_dir: Path, exit: bool = False) -> None:
        opts = oci_pb2.CheckpointOptions(exit=exit, image_path=str(image_dir))
        req = api.CheckpointTaskRequest(id=cid, path=str(image_dir))
        req.options.Pack(opts)
        self.call("Checkpoint", req)

    def status(self, cid: str) -> int:
        return self.call("State", api.StateRequest(id=cid)).status

    def create_from_checkpoint(self, cid: str, bundle: Path, rootfs: list[mount_pb2.Mount], image_dir: Path) -> int:
        req = api.CreateTaskRequest(id=cid, bundle=str(bundle), rootfs=rootfs, checkpoint=str(image_dir))
        return self.call("Create", req).pid

    def start(self, cid: str) -> int:
        return self.call("Start", api.StartRequest(id=cid)).pid

    def kill(self, cid: str, signal: int) -> None:
        self.call("Kill", api.KillRequest(id=cid, signal=signal))

    def remove(self, cid: str) -> None:
        """Kill (if running), wait and delete, as containerd does for `ctr task rm -f`."""
        from shim.ttrpc import TtrpcError

        with contextlib.suppress(TtrpcError):  # created-only or already stopped
            self.kill(cid, 9)
        if self.status(cid) in (2, 4):
            self.call("Wait", api.WaitRequest(id=cid), timeout=60)
        self.call("Delete", api.DeleteRequest(id=cid))


def snapshot_mounts(node: ContainerdNode, key: str) -> list[mount_pb2.Mount]:
    """The mounts of a snapshot, from `ctr snapshots mounts` (one `mount -t T SRC TARGET -o OPTS` line)."""
    line = ctr(node, "snapshots", "mounts", "/rootfs", key).stdout.strip()
    m = re.fullmatch(r"mount -t (\S+) (\S+) /rootfs -o (\S+)", line)
    assert m, f"unexpected `ctr snapshots mounts` output: {line!r}"
    return [mount_pb2.Mount(type=m[1], source=m[2], options=m[3].split(","))]


def upper_dir(mounts: list[mount_pb2.Mount]) -> Path:
    for o in mounts[0].options:
        if o.startswith("upperdir="):
            return Path(o.removeprefix("upperdir="))
    raise AssertionError(f"no upperdir in {mounts}")


def clone_snapshot(node: ContainerdNode, source_key: str, key: str) -> list[mount_pb2.Mount]:
    """A new active snapshot on the same parent holding a copy of `source_key`'s writable layer
    (a checkpoint restores only onto the files it was taken with)."""
    info = json.loads(ctr(node, "snapshots", "info", source_key).stdout)
    ctr(node, "snapshots", "prepare", key, info["Parent"])
    mounts = snapshot_mounts(node, key)
    subprocess.run(
        ["cp", "-a", f"{upper_dir(snapshot_mounts(node, source_key))}/.", str(upper_dir(mounts))], check=True
    )
    return mounts


def bundle_for(node: ContainerdNode, cid: str, spec_of: str | dict) -> Path:
    """A bundle where containerd would put it (so the shim derives the node's own runc root), holding
    the spec of container `spec_of` (or that spec itself) with a cgroup of its own."""
    bundle = node.bundle(cid)
    bundle.mkdir(parents=True)
    (bundle / "rootfs").mkdir()
    spec = dict(spec_of) if isinstance(spec_of, dict) else container_spec(node, spec_of)
    spec["linux"]["cgroupsPath"] = f"/{node.namespace}/{cid}"
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def remove_bundle(bundle: Path) -> None:
    shutil.rmtree(bundle, ignore_errors=True)
