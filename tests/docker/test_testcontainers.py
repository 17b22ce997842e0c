"""testcontainers-python against the private dockerd (DOCKER_HOST): a container with revenant's runtime,
and the `revenant_rehearsal` fixture the package ships as a pytest plugin (entry point pytest11)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from harness.docker import DOCKER_NAMESPACE, REVENANT_RUNTIME, DockerHost
from harness.wait import wait_until

from .test_rehearse import COUNTER, tcp_server  # noqa: F401

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def docker_env(docker_host: DockerHost, monkeypatch: pytest.MonkeyPatch) -> DockerHost:
    monkeypatch.setenv("DOCKER_HOST", docker_host.docker_daemon.host)
    monkeypatch.setenv("TESTCONTAINERS_RYUK_DISABLED", "true")  # its image cannot be pulled here
    return docker_host


def test_a_testcontainers_container_runs_on_revenant(docker_env: DockerHost) -> None:
    from testcontainers.core.container import DockerContainer

    container = (
        DockerContainer(docker_env.busybox)
        .with_command(["sh", "-c", "echo ready; exec sleep 1000"])
        .with_kwargs(runtime=REVENANT_RUNTIME, network_mode="none")
    )
    with container:
        wait_until(
            lambda: b"ready" in container.get_logs()[0],
            30,
            "the container's first line",
            detail=lambda: str(container.get_logs()),
        )
        code, out = container.exec(["sh", "-c", "echo $((6*7)); exit 3"])
        assert (code, out) == (3, b"42\n")
        cid = container.get_wrapped_container().id
        info = json.loads(docker_env.node.ctr("containers", "info", cid, namespace=DOCKER_NAMESPACE).stdout)
        assert info["Runtime"]["Name"] == REVENANT_RUNTIME
    assert docker_env.docker("ps", "-aq").stdout.strip() == ""


def test_revenant_rehearsal_fixture_on_a_job_that_survives(
    docker_env: DockerHost, revenant_rehearsal: Callable[..., object]
) -> None:
    report = revenant_rehearsal(
        docker_env.busybox,
        ["sh", "-c", COUNTER],
        interruptions=1,
        min_s=1,
        max_s=2,
        seed=3,
        progress_file="/tmp/progress",
        health_cmd="test -s /tmp/progress",
        run_dir=docker_env.node.revenant_run_dir,
    )
    assert report.ok, report  # type: ignore[attr-defined]
    assert [i.resumed for i in report.interruptions] == [True]  # type: ignore[attr-defined]
    assert "1/1 interruptions resumed: OK" in str(report)
    assert docker_env.docker("ps", "-aq").stdout.strip() == ""


def test_revenant_rehearsal_fixture_on_a_job_holding_a_tcp_connection(
    docker_env: DockerHost,
    revenant_rehearsal: Callable[..., object],
    tcp_server: int,  # noqa: F811
) -> None:
    report = revenant_rehearsal(
        docker_env.busybox,
        ["sh", "-c", f"while true; do sleep 1; done | nc 127.0.0.1 {tcp_server}"],
        interruptions=1,
        min_s=1,
        max_s=1,
        network="host",
        run_dir=docker_env.node.revenant_run_dir,
    )
    assert not report.ok  # type: ignore[attr-defined]
    (only,) = report.interruptions  # type: ignore[attr-defined]
    assert not only.checkpoint_ok and "open TCP connection" in only.reason, only
    assert "TCP" in only.detail or "tcp" in only.detail, only  # CRIU's own words are kept
