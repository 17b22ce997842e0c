"""Checkpoints the Docker way (experimental dockerd): `docker checkpoint create/ls/rm` and `docker start
--checkpoint`, through revenant's shim, with dockerd's own checkpoint directory and with --checkpoint-dir.
memjob's checksum, recomputed on the host, proves the memory came back."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from harness.docker import REVENANT_RUNTIME, RUNC_RUNTIME, DockerHost
from harness.memjob import LOG_IN_CONTAINER, assert_continuous, expected_checksum, memjob_args, read_steps
from harness.wait import wait_until

from .test_protect import steps_of, wait_steps

pytestmark = pytest.mark.timeout(600)

MIB, SEED = 32, 5


def status(host: DockerHost, name: str) -> str:
    return host.docker("inspect", "-f", "{{.State.Status}}", name).stdout.strip()


def test_checkpoint_and_start_from_it(docker_host: DockerHost, test_images, tmp_path: Path) -> None:
    name = f"ck-{uuid.uuid4().hex[:8]}"
    own_dir = ["--checkpoint-dir", str(tmp_path / "checkpoints")]
    docker_host.docker(
        "run", "-d", "--name", name, "--network", "none", "--runtime", REVENANT_RUNTIME,
        docker_host.memjob, *memjob_args(MIB, SEED, interval_ms=100),
    )  # fmt: skip
    try:
        wait_steps(docker_host, name, 5)
        # a leave-running checkpoint into the user's own directory: the job goes on
        docker_host.docker("checkpoint", "create", "--leave-running", *own_dir, name, "early")
        assert status(docker_host, name) == "running"
        # CRIU's images, written by revenant's shim, unpacked by dockerd into the user's directory
        assert (tmp_path / "checkpoints" / "early" / "inventory.img").is_file()
        assert "early" in docker_host.docker("checkpoint", "ls", *own_dir, name).stdout.split()
        reached = steps_of(docker_host, name)[-1].n
        wait_steps(docker_host, name, reached + 3)

        # dockerd sends checkpoint options (exit) only to its runc runtimes: with any other runtime a
        # checkpoint leaves the container running, and the user stops it.
        before = steps_of(docker_host, name)[-1].n
        docker_host.docker("checkpoint", "create", name, "final")
        assert status(docker_host, name) == "running"
        docker_host.docker("kill", name)
        wait_until(lambda: status(docker_host, name) == "exited", 60, "the container to stop")
        assert docker_host.docker("checkpoint", "ls", name).stdout.split()[-1] == "final"
        killed_at = steps_of_stopped(docker_host, name)

        # dockerd 26 creates and lists checkpoints in a custom directory but starts only from its own
        res = docker_host.docker("start", "--checkpoint", "early", *own_dir, name, check=False)
        assert res.returncode != 0 and "custom checkpointdir is not supported" in res.stderr, res
        docker_host.docker("checkpoint", "rm", *own_dir, name, "early")
        assert "early" not in docker_host.docker("checkpoint", "ls", *own_dir, name).stdout.split()

        docker_host.docker("start", "--checkpoint", "final", name)
        assert status(docker_host, name) == "running"
        steps = wait_steps(docker_host, name, killed_at + 3)
        # The log (in the writable layer) runs to the kill; the restored memory goes on from the checkpoint.
        restart = max(i for i in range(1, len(steps)) if steps[i].n <= steps[i - 1].n)
        resumed = steps[restart:]
        assert before < resumed[0].n <= killed_at + 1, (before, resumed[0], killed_at)
        assert_continuous(resumed)
        assert_continuous(steps[:restart])
        last = steps[-1]
        assert last.checksum == expected_checksum(test_images.memjob_binary, MIB, SEED, last.n)

        docker_host.docker("checkpoint", "rm", name, "final")
        assert "final" not in docker_host.docker("checkpoint", "ls", name).stdout.split()
    finally:
        docker_host.docker("rm", "-f", name, check=False)


def steps_of_stopped(host: DockerHost, name: str) -> int:
    """The last step in the stopped container's log, read from its writable layer on the host."""
    return read_steps(host.docker_daemon.upper_dir(name) / LOG_IN_CONTAINER.lstrip("/"))[-1].n


def test_dockerd_asks_only_its_runc_runtime_to_stop_after_a_checkpoint(docker_host: DockerHost) -> None:
    """`docker checkpoint create` without --leave-running: dockerd sends CheckpointOptions{exit} only when
    the runtime has runc options, so Docker's runc stops and revenant (told nothing) leaves the task running.
    Should a dockerd start sending them, this fails and the README's note can go."""
    outcome = {}
    for runtime in (RUNC_RUNTIME, REVENANT_RUNTIME):
        name = f"ex-{uuid.uuid4().hex[:8]}"
        docker_host.docker(
            "run", "-d", "--name", name, "--network", "none", "--runtime", runtime,
            docker_host.busybox, "sleep", "1000",
        )  # fmt: skip
        try:
            docker_host.docker("checkpoint", "create", name, "cp")
            wait_until(lambda name=name: status(docker_host, name) in ("exited", "running"), 30, "a state")
            time.sleep(1)  # an exit after the checkpoint would show by now
            outcome[runtime] = status(docker_host, name)
        finally:
            docker_host.docker("rm", "-f", name, check=False)
    assert outcome == {RUNC_RUNTIME: "exited", REVENANT_RUNTIME: "running"}, outcome
