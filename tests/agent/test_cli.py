"""`revenant drain` and `revenant agent` as processes, against the stand-in shims of conftest.py (real
ttrpc servers implementing revenant.v1.Control per the contract, standing in for the unfinished shim)."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from harness.wait import wait_until

REVENANT = [sys.executable, "-c", "import sys; from shim.cli import main; sys.exit(main())"]


def revenant(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*REVENANT, *args], capture_output=True, text=True, timeout=timeout)


def test_drain_reports_a_table_and_fails_when_a_task_fails(standins, run_dir: Path) -> None:
    standins.add("job-a")
    standins.add("job-bad", behavior="fail")
    standins.add("untouched", register=False)
    proc = revenant("drain", "--run-dir", str(run_dir), "--timeout", "20")
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["TASK", "KEY", "RESULT", "SEQ", "UPLOADED", "FROZEN", "TIME", "ERROR"]
    row = {line.split()[0]: line for line in lines[1:-1]}
    assert set(row) == {"default/job-a", "default/job-bad"}
    assert " ok " in row["default/job-a"] and "4.0 KiB" in row["default/job-a"]
    assert " failed " in row["default/job-bad"] and "store unreachable" in row["default/job-bad"]
    assert lines[-1].startswith("1 ok, 1 failed, 0 timed out of 2 task(s)")
    assert all(c.request.exit for s in standins.shims[:2] for c in s.calls)
    assert standins.shims[2].calls == []


def test_drain_json_and_leave_running(standins, run_dir: Path) -> None:
    shim = standins.add("job")
    proc = revenant("drain", "--run-dir", str(run_dir), "--json", "--leave-running")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] is True and doc["exit"] is False
    (task,) = doc["tasks"]
    assert task["id"] == "job" and task["status"] == "ok" and task["seq"] == 1 and task["bytes_uploaded"] == 4096
    assert shim.calls[0].request.exit is False


def test_drain_with_no_protected_tasks(run_dir: Path) -> None:
    proc = revenant("drain", "--run-dir", str(run_dir))
    assert proc.returncode == 0 and "no protected tasks" in proc.stdout


def test_drain_uses_revenant_run_dir_from_the_environment(standins, run_dir: Path) -> None:
    standins.add("job")
    env = {**os.environ, "REVENANT_RUN_DIR": str(run_dir)}
    proc = subprocess.run([*REVENANT, "drain", "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tasks"][0]["id"] == "job"


def progress_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "shim.progress: progress " in line]


def test_checkpoint_progress_is_phase_and_elapsed_time_only(standins, run_dir: Path) -> None:
    standins.add("slow", behavior="hang")  # answers nothing: the CLI waits for its whole --timeout
    proc = revenant("checkpoint", "slow", "--run-dir", str(run_dir), "--timeout", "1.5", "--progress-interval", "0.2")
    assert proc.returncode == 1 and "checkpoint timed out" in proc.stderr, proc.stderr
    lines = progress_lines(proc.stderr)
    assert len(lines) >= 4, proc.stderr
    assert all('label=checkpoint phase="shim checkpointing" elapsed_s=' in line for line in lines), lines
    assert not [line for line in lines if re.search("bytes|rate|eta", line)]  # the shim reports none
    elapsed = [float(re.search(r"elapsed_s=([\d.]+)", line)[1]) for line in lines]  # type: ignore[index]
    assert elapsed == sorted(elapsed) and elapsed[0] >= 0.19 and elapsed[-1] >= 1.0  # every 0.2 s, not at once
    assert "\r" not in proc.stderr + proc.stdout


def test_drain_progress_counts_the_answers(standins, run_dir: Path) -> None:
    standins.add("quick")
    standins.add("stuck", behavior="hang")
    args = ["drain", "--run-dir", str(run_dir), "--timeout", "2", "--progress-interval", "0.2", "--leave-running"]
    proc = revenant(*args)
    assert proc.returncode == 1, proc.stderr
    details = [re.search(r'detail="([^"]*)"', line)[1] for line in progress_lines(proc.stderr)]  # type: ignore[index]
    assert len(details) >= 4 and all(d.startswith("1/2 tasks answered, deadline in ") for d in details), details
    left = [int(re.search(r"in (\d+)s", d)[1]) for d in details]  # type: ignore[index]
    assert left == sorted(left, reverse=True) and left[0] == 2 and left[-1] == 0, details
    assert proc.stdout.splitlines()[-1].startswith("1 ok, 0 failed, 1 timed out of 2 task(s)")

    # On a terminal: one line rewritten in place, blanked before the table.
    master, slave = pty.openpty()
    with subprocess.Popen([*REVENANT, *args], stdout=subprocess.PIPE, stderr=slave, text=True) as child:
        os.close(slave)
        screen = b""
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child is gone
                break
            if not data:
                break
            screen += data
        table = child.stdout.read() if child.stdout else ""
    os.close(master)
    drawn = screen.decode().split("\r")
    assert any(
        re.fullmatch(r"drain  checkpointing  1/2 tasks answered, deadline in [01]s  elapsed [12]s *", d) for d in drawn
    ), drawn
    assert drawn[-1].strip() == "" and "TASK" in table and "\r" not in table


def test_agent_process_drains_on_notice_and_exits_cleanly_on_sigterm(metadata_server, standins, run_dir):
    srv = metadata_server(("aws",))
    shim = standins.add("job")
    proc = subprocess.Popen(
        [
            *REVENANT,
            "agent",
            "--provider",
            "auto",
            "--metadata-url",
            srv.url,
            "--poll-interval",
            "0.2",
            "--listen",
            "127.0.0.1:0",
            "--run-dir",
            str(run_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    logs: list[dict] = []
    reader = threading.Thread(target=lambda: logs.extend(json.loads(line) for line in proc.stderr), daemon=True)
    reader.start()
    try:

        def logged(event: str) -> dict | None:
            return next((entry for entry in list(logs) if entry.get("event") == event), None)

        listening = wait_until(
            lambda: logged("listening"),
            30,
            "the agent to listen",
            interval=0.05,
            abort=lambda: f"it exited with {proc.returncode}" if proc.poll() is not None else None,
            detail=lambda: f"its log: {logs}",
        )
        base = f"http://{listening['host']}:{listening['port']}"
        with urllib.request.urlopen(base + "/healthz", timeout=5) as resp:
            assert json.loads(resp.read())["provider"] == "aws"  # auto-detected

        notice_deadline = srv.aws_terminate(20)
        summary = wait_until(lambda: logged("drain_summary"), 30, "the drain summary", interval=0.05)
        assert summary["ok"] is True and summary["exit"] is True
        assert time.time() < notice_deadline
        result = logged("checkpoint_result")
        assert result["id"] == "job" and result["status"] == "ok" and result["seq"] == 1
        assert logged("notice")["action"] == "terminate"
        assert len(shim.calls) == 1 and shim.calls[0].request.exit
        with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
            assert 'revenant_agent_notices_total{provider="aws",action="terminate"} 1' in resp.read().decode()

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(5)
    assert any("SIGTERM received" in entry["msg"] for entry in logs)


def test_listen_defaults_to_loopback_unless_an_address_is_named() -> None:
    from shim.cli.agent import parse_listen

    assert parse_listen(":9810") == ("127.0.0.1", 9810)
    assert parse_listen("0.0.0.0:9810") == ("0.0.0.0", 9810)
    assert parse_listen("[::1]:9810") == ("::1", 9810)
    for bad in ("9810", "host:", "host:99999"):
        with pytest.raises(ValueError, match="expected HOST:PORT"):
            parse_listen(bad)
