"""Protection the Docker way: `docker run --runtime io.containerd.revenant.v1 --annotation
revenant.io/checkpoint-key=...` on host A (a node + its dockerd), A lost, the same `docker run` on host B
(another node + dockerd, same store) resumes the job with its memory and its writable layer.

dockerd mounts the rootfs with its own overlay2 driver and passes no rootfs mounts to the shim: the
marker file in the writable layer proves the shim found dockerd's upper dir on A and filled B's.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.containerd import VENV_BIN
from harness.docker import DOCKER_NAMESPACE, REVENANT_RUNTIME, DockerHost
from harness.memjob import (
    LOG_IN_CONTAINER,
    STEP_LINE,
    Step,
    assert_continuous,
    expected_checksum,
)
from harness.protect import MARKER_PATH, Job, annotation_flags
from harness.wait import wait_until

pytestmark = pytest.mark.timeout(600)


def revenant(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "revenant"), *args], capture_output=True, text=True, timeout=300)


def docker_run_job(host: DockerHost, job: Job, name: str) -> str:
    """The user's command, the same on A and on B; returns the container's full id."""
    return host.docker(
        "run", "-d", "--name", name, "--network", "none", "--runtime", REVENANT_RUNTIME,
        *annotation_flags(job.annotations()), host.memjob, *job.command(),
    ).stdout.strip()  # fmt: skip


def steps_of(host: DockerHost, name: str) -> list[Step]:
    res = host.docker("exec", name, "cat", LOG_IN_CONTAINER, check=False)
    return [Step(int(m[1]), m[2]) for m in (STEP_LINE.match(ln) for ln in res.stdout.splitlines()) if m]


def wait_steps(host: DockerHost, name: str, at_least: int, timeout: float = 120) -> list[Step]:
    def enough() -> list[Step] | None:
        steps = steps_of(host, name)
        return steps if steps and steps[-1].n >= at_least else None

    return wait_until(enough, timeout, f"step {at_least} of {name}", interval=0.3)


def record(host: DockerHost, cid: str) -> dict | None:
    path = host.node.revenant_run_dir / "tasks" / DOCKER_NAMESPACE / f"{cid}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def last_seq(host: DockerHost, cid: str) -> int:
    return int(((record(host, cid) or {}).get("last_checkpoint") or {}).get("seq") or 0)


def lose_host(host: DockerHost) -> None:
    """The host dies: dockerd and containerd SIGKILLed, every process of the node killed, all wiped."""
    host.docker_daemon.kill()
    host.node.kill()
    host.destroy()


def resume_on(host: DockerHost, job: Job, name: str, memjob_binary: Path) -> tuple[str, list[Step]]:
    cid = docker_run_job(host, job, name)
    wait_until(lambda: steps_of(host, name), 120, f"{name} running on B", interval=0.3)
    steps = wait_steps(host, name, steps_of(host, name)[-1].n + 3)
    last = steps[-1]
    assert last.checksum == expected_checksum(memjob_binary, job.mib, job.seed, last.n), "memory differs"
    marker = host.docker("exec", name, "cat", MARKER_PATH, check=False)
    assert marker.stdout.strip() == job.marker, f"the writable layer did not come back: {marker}"
    return cid, steps


def new_job(store: str, interval: str) -> Job:
    return Job("unused", f"docker/{uuid.uuid4().hex[:10]}/main", store, interval=interval,
               marker=f"marker-{uuid.uuid4().hex[:8]}")  # fmt: skip


def test_spot_notice_moves_a_docker_container(
    docker_host_factory: Callable[[str], DockerHost], test_images, tmp_path: Path, metadata_server, agent_factory
) -> None:
    a, b = docker_host_factory("a"), docker_host_factory("b")
    job = new_job(f"file://{tmp_path / 'store'}", interval="off")
    cid_a = docker_run_job(a, job, "trainer")
    wait_steps(a, "trainer", 5)
    upper = a.docker_daemon.upper_dir("trainer")
    assert (upper / MARKER_PATH.lstrip("/")).is_file()  # where the shim must look: dockerd's own upper dir

    # The CLI sees Docker's containers like any other: namespace moby, Docker's container id.
    (rec,) = json.loads(revenant("ls", "--run-dir", str(a.node.revenant_run_dir), "--json").stdout)
    assert (rec["namespace"], rec["id"], rec["key"]) == (DOCKER_NAMESPACE, cid_a, job.key), rec
    ck = revenant("checkpoint", cid_a, "-n", DOCKER_NAMESPACE, "--run-dir", str(a.node.revenant_run_dir), "--json")
    assert ck.returncode == 0 and json.loads(ck.stdout)["seq"] == 1, (ck.stdout, ck.stderr)
    assert a.docker("inspect", "-f", "{{.State.Status}}", "trainer").stdout.strip() == "running"

    agent = agent_factory(a.node.revenant_run_dir, metadata_server.url)
    metadata_server.aws_terminate(120)
    summary = agent.wait_drain()
    assert summary.get("ok") is True, agent.text()
    (result,) = agent.results()
    assert result["status"] == "ok" and result["exit"] is True and result["seq"] == 2, result
    wait_until(
        lambda: a.docker("inspect", "-f", "{{.State.Status}}", "trainer").stdout.strip() == "exited",
        60,
        "the container on A to stop after its final checkpoint",
    )
    lose_host(a)

    cid_b, steps_b = resume_on(b, job, "trainer", test_images.memjob_binary)
    assert cid_b != cid_a  # another container of another dockerd: only the key ties them
    assert_continuous(steps_b)
    assert steps_b[0].n == 1, "B's log is A's log carried over in the writable layer, then continued"
    rec_b = record(b, cid_b)
    assert rec_b is not None and rec_b["restored_from"] == 2, rec_b


def test_host_lost_without_notice_resumes_from_the_last_periodic_checkpoint(
    docker_host_factory: Callable[[str], DockerHost], test_images, tmp_path: Path
) -> None:
    a, b = docker_host_factory("a"), docker_host_factory("b")
    job = new_job(f"file://{tmp_path / 'store'}", interval="2s")
    cid_a = docker_run_job(a, job, "trainer")
    wait_until(lambda: last_seq(a, cid_a) >= 2, 120, "two periodic checkpoints on A")
    seq = last_seq(a, cid_a)
    reached = steps_of(a, "trainer")[-1].n
    lose_host(a)  # no final checkpoint

    cid_b, steps_b = resume_on(b, job, "trainer", test_images.memjob_binary)
    rec_b = record(b, cid_b)
    assert rec_b is not None and rec_b["restored_from"] >= seq, rec_b
    assert_continuous(steps_b)
    # It resumed from a checkpoint (not from step 1 in fresh memory) taken before A was lost.
    assert steps_b[0].n == 1 and steps_b[-1].n > 3
    assert any(s.n <= reached for s in steps_b)


def test_docker_restart_keeps_the_writable_layer(docker_host: DockerHost, tmp_path: Path) -> None:
    """A restart re-creates the task on the container's own, non-empty upper dir: the store's checkpoint
    must not be applied over it (the fill refuses a non-empty upper dir), dockerd's overlay must be
    mounted again as it was, and nothing written after the checkpoint may be lost."""
    job = new_job(f"file://{tmp_path / 'store'}", interval="off")
    cid = docker_host.docker(
        "run", "-d", "--name", "restarted", "--network", "none", "--runtime", REVENANT_RUNTIME,
        *annotation_flags(job.annotations()), docker_host.busybox,
        "sh", "-c", "echo before > /before; exec sleep 1000",
    ).stdout.strip()  # fmt: skip
    try:
        wait_until(lambda: record(docker_host, cid), 30, "the registry record")
        ck = revenant("checkpoint", cid, "-n", DOCKER_NAMESPACE, "--run-dir", str(docker_host.node.revenant_run_dir))
        assert ck.returncode == 0, ck.stderr
        docker_host.docker("exec", "restarted", "sh", "-c", "echo after > /after")
        docker_host.docker("restart", "-t", "1", "restarted")
        assert docker_host.docker("inspect", "-f", "{{.State.Status}}", "restarted").stdout.strip() == "running"
        files = docker_host.docker("exec", "restarted", "cat", "/before", "/after").stdout.split()
        assert files == ["before", "after"], files
        rec = wait_until(lambda: record(docker_host, cid), 30, "the record after the restart")
        assert rec["restored_from"] is None and "not empty" in (rec["fresh_reason"] or ""), rec
    finally:
        docker_host.docker("rm", "-f", "restarted", check=False)
