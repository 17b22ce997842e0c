"""The shim's parity scenarios (the lifecycle, stdio, exec, kill, pause, OOM and failure cases of containerd's
runc shim), run against the stock runc shim (parity reference) and revenant's shim.

Every test takes the `runtime` fixture, parametrized over both shims, on its own private containerd.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from harness.tools import require
from harness.wait import wait_until

from .conftest import Runtime
from .helpers import (
    ctr_with_tty,
    processes_of_node,
    shim_pid_of,
    task_status,
)


def test_run_rm_output_and_exit_codes(runtime: Runtime):
    res = runtime.run("hello", "echo", "hello from busybox", flags=("--rm",))
    assert res.stdout.strip() == "hello from busybox"
    assert runtime.run("ok", "true", flags=("--rm",)).returncode == 0
    res = runtime.run("fails", "sh", "-c", "echo oops >&2; exit 1", flags=("--rm",), check=False)
    assert res.returncode == 1, res
    assert "oops" in res.stderr

    # ctr run --rm in the foreground, SIGKILLed from outside: ctr exits with 128 + 9
    node = runtime.node
    fg = subprocess.Popen(
        [
            require("ctr", "containerd"),
            "-a",
            node.address,
            "-n",
            node.namespace,
            "run",
            "--rm",
            *runtime.run_flags(),
            runtime.image,
            "killed",
            "sleep",
            "1000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=node.env,
    )
    try:
        wait_until(lambda: task_status(node, "killed") == "RUNNING", 60, "killed RUNNING")
        runtime.ctr("task", "kill", "-s", "SIGKILL", "killed")
        out, err = fg.communicate(timeout=60)
    finally:
        if fg.poll() is None:
            fg.kill()
            fg.wait()
    assert fg.returncode == 137, (out, err)


def test_stdin_reaches_the_container(runtime: Runtime):
    if not runtime.is_revenant:
        # Seen here: the stock shim never closes the container's stdin for a piped `ctr run` (ctr
        # sends CloseIO only if stdin ends after NewTask returned); revenant copies the FIFO to EOF.
        pytest.xfail("stock runc shim hangs here (seen with containerd 1.6.20)")
    res = runtime.run("cat", "sh", "-c", "tr a-z A-Z", flags=("--rm",), input="piped through\n")
    assert res.stdout.strip() == "PIPED THROUGH"


def test_run_with_tty(runtime: Runtime):
    code, out = ctr_with_tty(
        runtime.node, "run", "--rm", "-t", *runtime.run_flags(), runtime.image, "tty1", "sh", "-c", "tty; echo tty-done"
    )
    assert code == 0, out
    assert "/dev/pts/" in out and "tty-done" in out


def test_detached_task_exec_with_and_without_tty(runtime: Runtime):
    runtime.run("box", "sleep", "1000", flags=("-d",))
    res = runtime.ctr("task", "exec", "--exec-id", "plain", "box", "sh", "-c", "echo exec-out; exit 3", check=False)
    assert res.returncode == 3, res
    assert res.stdout.strip() == "exec-out"
    code, out = ctr_with_tty(
        runtime.node, "task", "exec", "-t", "--exec-id", "withtty", "box", "sh", "-c", "tty; echo exec-tty-done"
    )
    assert code == 0, out
    assert "/dev/pts/" in out and "exec-tty-done" in out
    assert task_status(runtime.node, "box") == "RUNNING"

    # a detached exec shows up in `ctr task ps` with its exec id (ProcessInfo.info = ProcessDetails)
    runtime.ctr("task", "exec", "-d", "--exec-id", "background", "box", "sleep", "1000")
    wait_until(lambda: "background" in runtime.ctr("task", "ps", "box").stdout, 30, "exec listed by ps")


def test_kill_pause_resume_ps_metrics(runtime: Runtime):
    # pid 1 ignores signals it has no handler for: trap TERM to see a SIGTERM end the task
    runtime.run("svc", "sh", "-c", "trap 'exit 143' TERM; while true; do sleep 0.1; done", flags=("-d",))
    ps = runtime.ctr("task", "ps", "svc").stdout.split()
    pid = int(runtime.ctr("task", "ls").stdout.split("svc")[1].split()[0])
    assert str(pid) in ps

    metrics = runtime.ctr("task", "metrics", "svc").stdout
    assert "memory.usage_in_bytes" in metrics and "pids.current" in metrics, metrics

    runtime.ctr("task", "pause", "svc")
    assert task_status(runtime.node, "svc") == "PAUSED"
    runtime.ctr("task", "resume", "svc")
    assert task_status(runtime.node, "svc") == "RUNNING"

    runtime.ctr("task", "kill", "-s", "SIGTERM", "svc")
    wait_until(lambda: task_status(runtime.node, "svc") == "STOPPED", 30, "svc STOPPED after SIGTERM")
    res = runtime.ctr("task", "rm", "svc")
    assert "143" in res.stderr, res  # ctr reports the non-zero exit status of the deleted task
    assert not os.path.exists(f"/proc/{pid}")


def _pids_running(runtime: Runtime, cid: str, *argvs: str) -> list[int]:
    """Pids of the task's processes (`ctr task ps`, host pids) whose command line is one of argvs."""
    pids = []
    for word in runtime.ctr("task", "ps", cid).stdout.split():
        if word.isdigit():
            try:
                cmdline = Path(f"/proc/{word}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except FileNotFoundError:
                continue
            if cmdline in argvs:
                pids.append(int(word))
    return pids


def _alive(pid: int) -> bool:
    """Running, not a zombie its parent has yet to reap."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_kill_all_processes(runtime: Runtime):
    # Kill with `all` must signal every process of the container, not only its init. Init traps SIGUSR1
    # (a handler, which its children do not inherit) and never forwards it, so after `kill -a -s SIGUSR1`
    # init runs on and the two sleeps are gone only if the signal reached them directly: with `all`
    # dropped, only init gets it and the sleeps survive.
    script = "trap 'echo init-got-usr1' USR1; sleep 1001 & sleep 1002 & while true; do sleep 1; done"
    runtime.run("many", "sh", "-c", script, flags=("-d",))
    init = int(runtime.ctr("task", "ls").stdout.split("many")[1].split()[0])

    def both_sleeps() -> list[int]:
        found = _pids_running(runtime, "many", "sleep 1001", "sleep 1002")
        return found if len(found) == 2 else []

    sleeps = wait_until(both_sleeps, 30, "both sleeps running")
    runtime.ctr("task", "kill", "-a", "-s", "SIGUSR1", "many")
    wait_until(lambda: not any(_alive(p) for p in sleeps), 30, f"sleeps {sleeps} killed by kill -a")
    assert task_status(runtime.node, "many") == "RUNNING" and _alive(init), "init traps SIGUSR1: it must run on"
    runtime.ctr("task", "kill", "-a", "-s", "SIGKILL", "many")
    wait_until(lambda: task_status(runtime.node, "many") == "STOPPED", 30, "many STOPPED")
    assert not _alive(init)


def test_illegal_calls_fail_cleanly(runtime: Runtime):
    runtime.run("idle", "sleep", "1000", flags=("-d",))
    res = runtime.ctr("task", "resume", "idle", check=False)  # not paused
    assert res.returncode != 0
    res = runtime.ctr("task", "rm", "idle", check=False)  # running: needs --force
    assert res.returncode != 0
    assert task_status(runtime.node, "idle") == "RUNNING"


def test_task_start_attaches(runtime: Runtime):
    if not runtime.is_revenant:
        # ctr 1.6 `container create` has no --runc-root (and the stock shim ignores
        # --runtime-config-path), so it would use the machine-wide /run/containerd/runc, which tests
        # must not touch (environment.md).
        pytest.skip("stock runc shim: ctr 1.6 cannot give `container create` a per-node runc root")
    # "--": ctr's flag parser would read the command's "-c" as its own --config
    runtime.ctr(
        "container",
        "create",
        "--runtime",
        runtime.name,
        runtime.image,
        "later",
        "--",
        "sh",
        "-c",
        "echo attached-output; exit 5",
    )
    res = runtime.ctr("task", "start", "later", check=False)
    assert res.returncode == 5, res
    assert res.stdout.strip() == "attached-output"


def test_twenty_containers_at_once(runtime: Runtime):
    def one(i: int) -> subprocess.CompletedProcess[str]:
        return runtime.run(f"par{i}", "echo", f"container-{i}", flags=("--rm",), timeout=300)

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    for i, res in enumerate(results):
        assert res.stdout.strip() == f"container-{i}", res
    assert runtime.ctr("task", "ls", "-q").stdout.split() == []


def test_containerd_restart_while_tasks_run(runtime: Runtime):
    runtime.run("survivor", "sh", "-c", "while [ ! -e /tmp/go ]; do sleep 0.1; done; exit 7", flags=("-d",))
    shim_pid = shim_pid_of(runtime.node, "survivor")
    runtime.node.restart()
    assert os.path.exists(f"/proc/{shim_pid}"), "the shim must survive containerd's restart"
    assert task_status(runtime.node, "survivor") == "RUNNING"
    runtime.ctr("task", "exec", "--exec-id", "trigger", "survivor", "touch", "/tmp/go")
    wait_until(lambda: task_status(runtime.node, "survivor") == "STOPPED", 30, "survivor STOPPED")
    res = runtime.ctr("task", "rm", "survivor")
    assert "exit code 7" in res.stderr, res
    wait_until(lambda: not os.path.exists(f"/proc/{shim_pid}"), 30, "shim exits after its task is deleted")


def test_shim_killed_with_sigkill_is_cleaned_up(runtime: Runtime):
    runtime.run("orphan", "sleep", "1000", flags=("-d",))
    shim_pid = shim_pid_of(runtime.node, "orphan")
    task_pid = int(runtime.ctr("task", "ls").stdout.split("orphan")[1].split()[0])
    os.kill(shim_pid, signal.SIGKILL)
    # containerd notices the closed connection and runs `<shim> delete`: task and container process gone
    wait_until(lambda: "orphan" not in runtime.ctr("task", "ls", "-q").stdout.split(), 60, "task removed")
    wait_until(lambda: not os.path.exists(f"/proc/{task_pid}"), 30, "container process killed")
    assert not [m for m in runtime.node.mounts() if "/orphan/" in m + "/"]
    assert "orphan" not in runtime.node.runc_containers()


def test_broken_config_fails_clearly_and_leaves_nothing(runtime: Runtime, tmp_path: Path):
    res = runtime.run("nobinary", "/does-not-exist", flags=("--rm",), check=False)
    assert res.returncode != 0
    assert "does-not-exist" in res.stderr, res.stderr

    spec = json.loads(runtime.ctr("oci", "spec").stdout)
    spec["process"]["args"] = ["true"]
    spec["linux"]["namespaces"].append({"type": "bogus"})
    config = tmp_path / "config.json"
    config.write_text(json.dumps(spec))
    res = runtime.node.ctr("run", "--rm", *runtime.run_flags(), "--config", str(config), "badspec", check=False)
    assert res.returncode != 0
    assert "bogus" in res.stderr, res.stderr

    def nothing_left() -> bool:
        return not processes_of_node(runtime.node, "nobinary", "badspec") and not runtime.node.mounts()

    wait_until(nothing_left, 30, "no shim, container process or mount left")
    assert runtime.ctr("task", "ls", "-q").stdout.split() == []
    assert list(runtime.node.runc_containers()) == []


def test_oom_kill_is_reported(runtime: Runtime, test_images):
    image = runtime.node.import_image(test_images.memjob)
    events = subprocess.Popen(
        [require("ctr", "containerd"), "-a", runtime.node.address, "events"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=runtime.node.env,
    )
    try:
        time.sleep(0.5)  # let the subscription start
        res = runtime.node.ctr(
            "run",
            "--rm",
            *runtime.run_flags(),
            "--memory-limit",
            str(32 << 20),
            image,
            "hog",
            "memjob",
            "--mib",
            "128",
            "--mutate",
            "0.1",
            "--interval-ms",
            "10",
            "--seed",
            "1",
            "--steps",
            "3",
            check=False,
            input="",
        )
        assert res.returncode == 137, res
        time.sleep(1.0)
    finally:
        events.terminate()
        out, _ = events.communicate(timeout=10)
    assert "/tasks/oom" in out, out


def _text(path: Path) -> str:
    try:
        return f"{path} holds {path.read_text()!r}"
    except OSError as e:
        return f"{path}: {e}"


def test_log_uris_file_and_binary(runtime: Runtime, tmp_path: Path):
    log_file = tmp_path / "file.log"
    # `--rm` deletes the task as soon as it exits. revenant's shim finishes copying its output first; the
    # stock shim under load may not (a line missing after 60 s, seen once in a full run), so its task is
    # deleted only after the check: the parity asked of it is the file's content, not that race.
    rm = ("--rm",) if runtime.is_revenant else ()
    runtime.run(
        "filelog", "sh", "-c", "echo to-file; echo err-to-file >&2", flags=(*rm, "--log-uri", f"file://{log_file}")
    )
    # Both shims copy output asynchronously: the file may lag the task's exit by a moment.
    wait_until(
        lambda: "to-file" in log_file.read_text() and "err-to-file" in log_file.read_text(),
        60,  # generous: the stock shim's copy lagged past 10 s on a loaded 2-core machine
        "stdout and stderr in the log file",
        ignore=(FileNotFoundError,),
        detail=lambda: _text(log_file),
    )
    if not rm:
        runtime.ctr("task", "rm", "-f", "filelog", check=False)
        runtime.ctr("containers", "rm", "filelog", check=False)

    # The logging-binary protocol: stdout on fd 3, stderr on fd 4, fd 5 closed once ready.
    out = tmp_path / "binary.log"
    logger = tmp_path / "logger.sh"
    logger.write_text('#!/bin/sh\nexec 5>&-\ncat <&3 >"$1.out" &\ncat <&4 >"$1.err"\nwait\n')
    logger.chmod(0o755)
    runtime.run(
        "binlog",
        "sh",
        "-c",
        "echo to-binary; echo err-to-binary >&2",
        flags=("--rm", "--log-uri", f"binary://{logger}?{out}"),
    )
    wait_until(
        lambda: Path(f"{out}.err").exists() and "err-to-binary" in Path(f"{out}.err").read_text(),
        30,
        "the logging binary received stderr",
    )
    wait_until(
        lambda: "to-binary" in Path(f"{out}.out").read_text(),
        30,
        "the logging binary received stdout",
        ignore=(FileNotFoundError,),
    )


def test_update_resources_over_the_task_api(runtime: Runtime):
    """ctr 1.6 has no `task update`: call Task/Update on the shim's own socket, as containerd does."""
    from google.protobuf import empty_pb2

    from revenant_pb.containerd.task.v2 import shim_pb2
    from shim.ttrpc import NAMESPACE_KEY, Client

    runtime.run("upd", "sleep", "1000", flags=("-d",))
    address = (runtime.node.bundle("upd") / "address").read_text().strip()
    req = shim_pb2.UpdateTaskRequest(id="upd")
    req.resources.type_url = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
    req.resources.value = json.dumps({"memory": {"limit": 64 << 20}}).encode()
    with Client(address, timeout=30) as client:
        client.call(
            "containerd.task.v2.Task", "Update", req, empty_pb2.Empty, metadata={NAMESPACE_KEY: runtime.node.namespace}
        )
    limit = Path(f"/sys/fs/cgroup/memory/{runtime.node.namespace}/upd/memory.limit_in_bytes")
    assert int(limit.read_text()) == 64 << 20
