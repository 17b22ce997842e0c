"""A container in a network namespace given by path (as a Kubernetes pod's), checkpointed on node A
and restored on node B into ANOTHER namespace path.

runc treats a network namespace with a path as external: it dumps with
`--external net[<inode>]:extRootNetNS` and on restore hands CRIU the namespace named in the NEW
bundle's spec. ctr 1.6 cannot restore with a changed spec (`ctr containers restore` reuses the
checkpointed one), so node B's task is created as Kubernetes' runtime would create it: a bundle whose
spec names B's namespace, Task/Create with checkpoint=DIR on a revenant shim's socket (shim_direct.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid

from harness.memjob import memjob_args
from harness.tools import require
from harness.wait import wait_until
from revenant_pb.containerd.task.v2 import shim_pb2 as api

from .shim_direct import Shim, snapshot_mounts, upper_dir
from .test_image_dir import MIB, SEED, resume_from
from .util import REVENANT, container_spec, ctr, last_step, memjob_log, wait_for_step


@contextlib.contextmanager
def named_netns(name: str):
    ip = require("ip", "iproute2")
    subprocess.run([ip, "netns", "add", name], check=True)
    try:
        subprocess.run([ip, "-n", name, "link", "set", "lo", "up"], check=True)
        yield f"/var/run/netns/{name}"
    finally:
        subprocess.run([ip, "netns", "delete", name], check=False)


def netns_inode_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def task_pid(node, cid: str) -> int:
    for line in ctr(node, "task", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return int(fields[1])
    raise AssertionError(f"no task {cid}")


def test_external_netns_moves_to_another_namespace_path(node_factory, test_images, tmp_path):
    tag = uuid.uuid4().hex[:6]
    images, saved_upper = tmp_path / "images", tmp_path / "upper"
    with named_netns(f"ck-a-{tag}") as path_a:
        a = node_factory("a")
        image = a.import_image(test_images.memjob)
        ctr(
            a,
            "run",
            "-d",
            "--runtime",
            REVENANT,
            "--with-ns",
            f"network:{path_a}",
            image,
            "ck-net",
            *memjob_args(MIB, SEED),
        )
        wait_for_step(memjob_log(a, "ck-net"), 2, timeout=60)
        assert netns_inode_of(task_pid(a, "ck-net")) == os.stat(path_a).st_ino  # it runs in A's namespace
        Shim(a, "ck-net").checkpoint("ck-net", images, exit=True)
        wait_until(
            lambda: (
                "ck-net" not in ctr(a, "task", "ls", "-q").stdout.split() or "STOPPED" in ctr(a, "task", "ls").stdout
            ),
            30,
            "the exit checkpoint stopped ck-net",
        )
        at = last_step(memjob_log(a, "ck-net"))
        spec = container_spec(a, "ck-net")
        subprocess.run(["cp", "-a", f"{upper_dir(snapshot_mounts(a, 'ck-net'))}/.", str(saved_upper)], check=True)
        a.destroy()  # node A and its namespace are gone before B restores

    with named_netns(f"ck-b-{tag}") as path_b:
        b = node_factory("b")
        image = b.import_image(test_images.memjob)
        ctr(b, "run", "-d", "--runtime", REVENANT, image, "ck-keeper", "sleep", "100000")
        parent = json.loads(ctr(b, "snapshots", "info", "ck-keeper").stdout)["Parent"]
        ctr(b, "snapshots", "prepare", "ck-net-b", parent)
        rootfs = snapshot_mounts(b, "ck-net-b")
        subprocess.run(["cp", "-a", f"{saved_upper}/.", str(upper_dir(rootfs))], check=True)
        for ns in spec["linux"]["namespaces"]:
            if ns["type"] == "network":
                assert ns["path"] == path_a
                ns["path"] = path_b  # the new pod's namespace on node B
        shim = Shim(b, "ck-keeper")
        seen: dict[str, int] = {}

        def check_netns() -> None:
            pid = shim.call("State", api.StateRequest(id="ck-net")).pid
            seen["inode"] = netns_inode_of(pid)

        resume_from(
            b, shim, "ck-net", spec, images, test_images.memjob_binary, at, rootfs=rootfs, while_running=check_netns
        )
        assert seen["inode"] == os.stat(path_b).st_ino, "the restored task is not in node B's namespace"
        assert seen["inode"] != os.stat("/proc/self/ns/net").st_ino
