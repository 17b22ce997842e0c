"""`revenant rehearse` against a private dockerd (and plain containerd): a job that survives its
interruptions, and one that cannot (an open TCP connection to a server outside the container)."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

from harness.containerd import VENV_BIN
from harness.docker import DockerHost

pytestmark = pytest.mark.timeout(600)

COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/progress; sleep 0.1; done"


def rehearse(host: DockerHost, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(VENV_BIN / "revenant"), "rehearse", "--run-dir", str(host.node.revenant_run_dir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=500, env=host.docker_daemon.env)


def test_a_job_that_survives(docker_host: DockerHost) -> None:
    res = rehearse(
        docker_host, "--interruptions", "2", "--min", "1", "--max", "2", "--seed", "7",
        "--progress-file", "/tmp/progress", "--health-cmd", "test -s /tmp/progress", "--json",
        docker_host.busybox, "--", "sh", "-c", COUNTER,
    )  # fmt: skip
    report = json.loads(res.stdout)
    assert res.returncode == 0, json.dumps(report["interruptions"])
    assert report["ok"] is True and report["error"] is None, report
    assert [i["n"] for i in report["interruptions"]] == [1, 2]
    for i in report["interruptions"]:
        assert i["checkpoint_ok"] and i["resumed"] and i["health_ok"], i
        assert i["seq"] == i["n"]  # one final checkpoint per interruption, restored by the next container
        assert i["checkpoint_bytes"] > 0 and i["freeze_s"] > 0 and i["restore_s"] > 0, i
        assert i["progress_after"] >= i["progress_before"] > 0, i
    # nothing left behind
    assert docker_host.docker("ps", "-aq").stdout.strip() == ""


@pytest.fixture
def tcp_server() -> Iterator[int]:
    """A server in the host's network namespace that accepts and holds connections open."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.5)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    for s in held:
        s.close()
    srv.close()


def test_a_job_holding_a_tcp_connection_cannot_move(docker_host: DockerHost, tcp_server: int) -> None:
    job = f"while true; do sleep 1; done | nc 127.0.0.1 {tcp_server}"
    res = rehearse(
        docker_host, "--interruptions", "2", "--min", "1", "--max", "1", "--network", "host",
        docker_host.busybox, "--", "sh", "-c", job,
    )  # fmt: skip
    assert res.returncode == 1, (res.stdout, res.stderr)
    out = res.stdout
    assert "open TCP connection" in out, out
    assert "FAILED" in out and "0/1 interruptions resumed: NOT OK" in out, out
    assert docker_host.docker("ps", "-aq").stdout.strip() == ""


def test_plain_containerd_engine(docker_host: DockerHost, test_images) -> None:
    node = docker_host.node
    image = node.import_image(test_images.busybox)
    res = rehearse(
        docker_host, "--engine", "containerd", "--address", node.address, "--namespace", node.namespace,
        "-n", "1", "--min", "1", "--max", "1", "--progress-file", "/tmp/progress", "--json",
        image, "--", "sh", "-c", COUNTER,
    )  # fmt: skip
    report = json.loads(res.stdout)
    assert res.returncode == 0, json.dumps(report)
    (only,) = report["interruptions"]
    assert only["resumed"] and only["progress_after"] >= only["progress_before"] > 0, only
    assert node.ctr("containers", "ls", "-q").stdout.strip() == ""
