"""What a Docker user does, with `--runtime io.containerd.revenant.v1` and with Docker's default runtime
(runc) on the same dockerd: the two must behave alike."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time
import uuid

from harness.docker import DOCKER, DOCKER_NAMESPACE, REVENANT_RUNTIME, DockerHost
from harness.wait import wait_until


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def run(host: DockerHost, runtime: str, *args: str, check: bool = False, timeout: float = 120):
    return host.docker("run", "--network", "none", "--runtime", runtime, *args, check=check, timeout=timeout)


def state(host: DockerHost, name: str) -> dict:
    return json.loads(host.docker("inspect", "-f", "{{json .State}}", name).stdout)


def shim_binary(host: DockerHost, name: str) -> str:
    """Which shim containerd started for the container (the proof the runtime was really used)."""
    cid = host.docker("inspect", "-f", "{{.Id}}", name).stdout.strip()
    info = json.loads(host.node.ctr("containers", "info", cid, namespace=DOCKER_NAMESPACE).stdout)
    return info["Runtime"]["Name"]


def test_run_attached_output_and_exit_codes(docker_host: DockerHost, runtime: str):
    res = run(docker_host, runtime, "--rm", docker_host.busybox, "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (res.returncode, res.stdout, res.stderr) == (7, "out\n", "err\n"), res
    res = run(docker_host, runtime, "--rm", docker_host.busybox, "true")
    assert (res.returncode, res.stdout) == (0, ""), res
    # stdin reaches the container with -i
    res = docker_host.docker(
        "run", "--rm", "-i", "--network", "none", "--runtime", runtime, docker_host.busybox, "tr", "a-z", "A-Z",
        input="hello docker\n", check=False,
    )  # fmt: skip
    assert (res.returncode, res.stdout) == (0, "HELLO DOCKER\n"), res
    # a command that does not exist: Docker's 127, from the runtime's create error
    res = run(docker_host, runtime, "--rm", docker_host.busybox, "/no/such/binary")
    assert res.returncode == 127, res
    assert "no such file or directory" in res.stderr.lower(), res


def test_detached_logs_exec_top_stats_pause(docker_host: DockerHost, runtime: str):
    name = _name("job")
    script = "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done"
    run(docker_host, runtime, "-d", "--name", name, docker_host.busybox, "sh", "-c", script, check=True)
    try:
        assert shim_binary(docker_host, name) == (
            REVENANT_RUNTIME if runtime == REVENANT_RUNTIME else "io.containerd.runc.v2"
        )
        wait_until(lambda: "tick 3" in docker_host.docker("logs", name).stdout, 30, "logs")
        logs = docker_host.docker("logs", name).stdout.splitlines()
        assert logs[:3] == ["tick 0", "tick 1", "tick 2"], logs

        res = docker_host.docker("exec", name, "sh", "-c", "echo from exec; exit 4", check=False)
        assert (res.returncode, res.stdout) == (4, "from exec\n"), res
        res = docker_host.docker("exec", "-i", name, "cat", input="piped\n", check=False)
        assert (res.returncode, res.stdout) == (0, "piped\n"), res
        res = docker_host.docker("exec", name, "/no/such/binary", check=False)
        assert res.returncode == 126, res  # Docker's exit code for an exec the runtime could not start
        assert "no such file or directory" in res.stdout + res.stderr, res

        top = docker_host.docker("top", name).stdout
        assert "sh -c i=0" in top and "sleep" in top, top

        stats = json.loads(docker_host.docker("stats", "--no-stream", "--format", "{{json .}}", name).stdout)
        assert stats["Name"] == name
        assert not stats["MemUsage"].startswith("0B"), stats  # cgroup numbers came back through the shim
        assert int(stats["PIDs"]) >= 1, stats

        docker_host.docker("pause", name)
        assert state(docker_host, name)["Status"] == "paused"
        before = len(docker_host.docker("logs", name).stdout.splitlines())
        time.sleep(1.0)
        assert len(docker_host.docker("logs", name).stdout.splitlines()) == before  # frozen: no ticks
        docker_host.docker("unpause", name)
        assert state(docker_host, name)["Status"] == "running"
        wait_until(lambda: len(docker_host.docker("logs", name).stdout.splitlines()) > before + 2, 30, "ticks")
    finally:
        docker_host.docker("rm", "-f", name, check=False)


STOPS = {("stop", "-t", "1"): 137, ("kill",): 137, ("kill", "-s", "TERM"): 143}


def test_stop_and_kill_exit_codes(docker_host: DockerHost, runtime: str):
    # The TERM trap makes TERM fatal with 143; the stopped one ignores TERM, so stop ends it with KILL.
    # "ready" once the trap is set: a signal before that would find sh's default (pid 1 ignores TERM).
    names = {how: _name("stop") for how in STOPS}
    try:
        for how, name in names.items():
            trap = "trap '' TERM" if how[0] == "stop" else "trap 'exit 143' TERM"
            script = f"{trap}; echo ready; sleep 1000 & wait"
            run(docker_host, runtime, "-d", "--name", name, docker_host.busybox, "sh", "-c", script, check=True)
        for how, name in names.items():
            wait_until(lambda name=name: "ready" in docker_host.docker("logs", name).stdout, 30, "ready")
            docker_host.docker(*how, name)
        stop = names[("stop", "-t", "1")]
        for how, name in names.items():
            wait_until(lambda name=name: state(docker_host, name)["Status"] == "exited", 30, f"{how} to end it")
            assert state(docker_host, name)["ExitCode"] == STOPS[how], how
            assert docker_host.docker("wait", name).stdout.strip() == str(STOPS[how])
        # a stopped container starts again
        docker_host.docker("start", stop)
        assert state(docker_host, stop)["Status"] == "running"
    finally:
        docker_host.docker("rm", "-f", *names.values(), check=False)


def test_restart_policies(docker_host: DockerHost, runtime: str):
    name = _name("restart")
    run(docker_host, runtime, "-d", "--name", name, "--restart", "on-failure:2", docker_host.busybox,
        "sh", "-c", "echo run; exit 3", check=True)  # fmt: skip
    try:
        wait_until(
            lambda: state(docker_host, name)["Status"] == "exited" and docker_host.inspect_restarts(name) == 2,
            60,
            "two restarts, then exited",
        )
        assert state(docker_host, name)["ExitCode"] == 3
        assert docker_host.docker("logs", name).stdout.splitlines() == ["run"] * 3
    finally:
        docker_host.docker("rm", "-f", name, check=False)

    name = _name("always")
    run(docker_host, runtime, "-d", "--name", name, "--restart", "always", docker_host.busybox,
        "sh", "-c", "sleep 0.3; exit 0", check=True)  # fmt: skip
    try:
        wait_until(lambda: docker_host.inspect_restarts(name) >= 2, 60, "restarts of an always container")
    finally:
        docker_host.docker("rm", "-f", name, check=False)


def test_interactive_tty(docker_host: DockerHost, runtime: str):
    """`docker run -it` through a real pty: the container sees a terminal, input echoes back, and the
    exit code comes through."""
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [str(DOCKER), "-H", docker_host.docker_daemon.host, "run", "--rm", "-it", "--network", "none",
         "--runtime", runtime, docker_host.busybox, "sh"],
        stdin=secondary, stdout=secondary, stderr=secondary, env=docker_host.docker_daemon.env, start_new_session=True,
    )  # fmt: skip
    os.close(secondary)
    seen = b""

    def read_until(marker: bytes, timeout: float = 30) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {marker!r} from the pty; got {seen!r}"
            if select.select([primary], [], [], left)[0]:
                try:
                    seen += os.read(primary, 4096)
                except OSError:
                    break
        assert marker in seen, seen

    try:
        read_until(b"# ")  # the shell's prompt: it runs on a terminal
        os.write(primary, b"tty; stty size; echo done-$((6*7))\r")
        read_until(b"done-42")
        assert b"/dev/pts/" in seen, seen
        os.write(primary, b"exit 5\r")
        assert proc.wait(30) == 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(primary)


def test_short_runtime_name_from_daemon_json(docker_host: DockerHost):
    """daemon.json `runtimes: {revenant: {runtimeType: io.containerd.revenant.v1}}` (the README's)."""
    name = _name("short")
    res = docker_host.docker(
        "run", "-d", "--name", name, "--network", "none", "--runtime", "revenant", docker_host.busybox, "sleep", "100"
    )
    try:
        assert res.returncode == 0, res
        assert shim_binary(docker_host, name) == REVENANT_RUNTIME
    finally:
        docker_host.docker("rm", "-f", name, check=False)
