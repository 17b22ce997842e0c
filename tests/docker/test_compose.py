"""The README's docker-compose example: a service with revenant's runtime and annotations is protected."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

from harness.docker import DOCKER_COMPOSE, DOCKER_NAMESPACE, REVENANT_RUNTIME, DockerHost
from harness.wait import wait_until

COMPOSE = """\
services:
  trainer:
    image: {image}
    runtime: io.containerd.revenant.v1
    network_mode: none
    annotations:
      revenant.io/checkpoint-key: {key}
      revenant.io/store: {store}
      revenant.io/checkpoint-interval: "10m"
    command: ["/bin/memjob", "--mib", "16", "--seed", "1", "--log", "/var/log/memjob.log"]
"""


def test_compose_service_runs_protected_on_revenant(docker_host: DockerHost, tmp_path: Path) -> None:
    key = f"compose/{uuid.uuid4().hex[:8]}/trainer"
    compose_file = tmp_path / "docker-compose.yml"
    compose_file.write_text(COMPOSE.format(image=docker_host.memjob, key=key, store=f"file://{tmp_path / 'store'}"))
    project = f"rv{uuid.uuid4().hex[:6]}"

    def compose(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(DOCKER_COMPOSE), "-p", project, "-f", str(compose_file), *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=docker_host.docker_daemon.env)
        assert res.returncode == 0, (cmd, res.stdout, res.stderr)
        return res

    compose("up", "-d")
    try:
        cid = compose("ps", "-q", "trainer").stdout.strip()
        assert cid
        info = json.loads(docker_host.node.ctr("containers", "info", cid, namespace=DOCKER_NAMESPACE).stdout)
        assert info["Runtime"]["Name"] == REVENANT_RUNTIME
        record = docker_host.node.revenant_run_dir / "tasks" / DOCKER_NAMESPACE / f"{cid}.json"
        wait_until(record.exists, 30, "the shim's registry record of the compose service")
        rec = json.loads(record.read_text())
        assert (rec["key"], rec["interval_s"]) == (key, 600), rec
    finally:
        compose("down", "-t", "1")
