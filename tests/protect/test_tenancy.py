"""Tenancy through a real Create: on a node that names its stores, a container's annotations cannot
point the root shim at a store of their own or at another namespace's key (docs/security.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.containerd import ContainerdNode
from harness.protect import Job, registry_record, run_job, task_status

pytestmark = pytest.mark.timeout(600)


def test_create_refuses_a_foreign_store_or_key_and_names_why(
    containerd_node: ContainerdNode, test_images, tmp_path: Path
) -> None:
    node = containerd_node
    node.write_revenant_config(
        f'min_checkpoint_interval = "1s"\nscratch_dir = "{node.revenant_scratch}"\n'
        f'default_store = "team"\n[stores.team]\nurl = "file://{tmp_path / "team-store"}"\n'
    )
    image = node.import_image(test_images.busybox)
    pod = {
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.sandbox-namespace": "ml",
        "io.kubernetes.cri.sandbox-name": "trainer",
        "io.kubernetes.cri.container-name": "main",
    }
    refused = {
        "url": (
            {"revenant.io/checkpoint-key": "ml/trainer/main", "revenant.io/store": f"file://{tmp_path / 'mine'}"},
            ["revenant.io/store", "is a URL", "allow_store_urls"],
        ),
        "endpoint": (
            {
                "revenant.io/checkpoint-key": "ml/trainer/main",
                "revenant.io/store": "s3://revenant-test/x?endpoint=http://127.0.0.2:9",
            },
            ["revenant.io/store", "is a URL"],
        ),
        "name": (
            {"revenant.io/checkpoint-key": "ml/trainer/main", "revenant.io/store": "other"},
            ["revenant.io/store", "no store named 'other'", "team"],
        ),
        "key": (
            {"revenant.io/checkpoint-key": "prod/payments/main"},
            ["revenant.io/checkpoint-key", "outside the pod's namespace", "'ml/'"],
        ),
    }
    for cid, (given, says) in refused.items():
        res = run_job(
            node, image, Job(cid, "", ""), check=False, annotations={**pod, **given}, command=["sleep", "600"]
        )
        assert res.returncode != 0, f"{cid}: Create was accepted"
        for part in says:
            assert part in res.stderr, (cid, part, res.stderr)
        assert task_status(node, cid) == "ABSENT"
        assert registry_record(node, cid) is None
    assert not (tmp_path / "mine").exists(), "the shim touched the store the annotation named"

    # The same pod naming the node's store and a key in its namespace is protected.
    ok = {**pod, "revenant.io/checkpoint-key": "ml/trainer/main", "revenant.io/store": "team"}
    run_job(node, image, Job("ok", "", ""), annotations=ok, command=["sleep", "600"])
    rec = registry_record(node, "ok")
    assert rec is not None and rec["store"] == f"file://{tmp_path / 'team-store'}", rec
