"""Checkpoint statistics (CRIU's stats-dump, as Podman's --print-stats): logged by the shim and returned
by revenant.v1.Control/Stats on the shim's socket, read here with the `revenant stats` CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .util import REVENANT, ctr, run_memjob

MIB = 64
REVENANT_CLI = str(Path(sys.executable).parent / "revenant")


def test_last_checkpoint_statistics_over_control_and_in_the_log(node_factory, test_images):
    node = node_factory("a")
    image = node.import_image(test_images.memjob)
    run_memjob(node, image, "ck-stats", MIB, 3)
    cli = [REVENANT_CLI, "stats", "ck-stats", "--namespace", node.namespace, "--state", str(node.state)]
    none_yet = subprocess.run(cli, capture_output=True, text=True)
    assert none_yet.returncode == 1 and "no checkpoint" in none_yet.stderr, none_yet

    ctr(node, "container", "checkpoint", "--task", "--rw", "ck-stats", "localhost/checkpoint/stats:1")
    out = subprocess.run([*cli, "--json"], capture_output=True, text=True, check=True).stdout
    stats = json.loads(out)
    criu = stats["criu"]
    assert stats["container_id"] == "ck-stats"
    for key in ("freezing_time_us", "frozen_time_us", "memdump_time_us", "memwrite_time_us"):
        assert criu[key] > 0, (key, stats)
    assert criu["pages_scanned"] >= criu["pages_written"] >= MIB * 256, stats  # 4 KiB pages of the state
    assert stats["image_bytes"] >= MIB << 20, stats
    text = subprocess.run(cli, capture_output=True, text=True, check=True).stdout
    assert "frozen time" in text and "pages written" in text, text

    shim_log = node.log_path.read_text()
    assert "checkpointed ck-stats" in shim_log and f"pages scanned {criu['pages_scanned']}" in shim_log
    assert REVENANT in ctr(node, "containers", "info", "ck-stats").stdout
