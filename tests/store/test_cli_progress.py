"""`revenant store put|get` progress: a live line on a terminal (a real pseudo-terminal), periodic log lines
elsewhere, and stdout (text summary or --json) the same either way."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

KEY = "default/mypod/main"
MIB = 1 << 20
REVENANT = str(Path(sys.executable).parent / "revenant")
INFO_KEYS = {
    "key",
    "seq",
    "parent",
    "created",
    "files",
    "bytes_read",
    "bytes_uploaded",
    "chunks_total",
    "chunks_new",
    "dedup_ratio",
    "metadata",
}
LIVE_LINE = re.compile(r"(upload|download)  [\d.]+ (B|KiB|MiB) / 6\.0 MiB \d+%  [\d.]+ MiB/s  ETA (\d+s|\d+m\d\ds)")


def make_tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    for i in range(4):
        (root / f"pages-{i}.img").write_bytes(os.urandom(MIB))
    (root / "sub" / "big.img").write_bytes(os.urandom(2 * MIB))
    return root


def run_on_terminal(args: list[str], *, stdout_pipe: bool = False, timeout: float = 120) -> tuple[int, str, str]:
    """Run `revenant ARGS` with stderr (and stdout unless stdout_pipe) on a pseudo-terminal; returns
    (exit code, what the terminal got with its \\r\\n turned back into \\n, stdout if piped)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [REVENANT, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if stdout_pipe else slave,
        stderr=slave,
    )
    os.close(slave)
    got = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal's last descriptor
                break
            if not data:
                break
            got += data
        out = proc.stdout.read().decode() if proc.stdout else ""
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return rc, got.decode().replace("\r\n", "\n"), out


def run_piped(args: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([REVENANT, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_put_and_get_on_a_terminal_show_a_live_line_then_the_summary(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    store = f"file://{tmp_path}/store"
    rc, screen, _ = run_on_terminal(["store", "put", "--store", store, "--key", KEY, str(src)])
    assert rc == 0, screen
    assert "\r" in screen and LIVE_LINE.search(screen), screen
    *drawn, last = screen.rstrip("\n").split("\n")[-1].split("\r")
    assert drawn and drawn[-1].strip() == "", screen  # the live line was blanked before the summary
    summary = re.fullmatch(
        r"put default/mypod/main seq 1: 6\.0 MiB in [\d.]+s \([\d.]+ MiB/s\); uploaded [\d.]+ MiB, "
        r"reused 0/(\d+) chunks \(dedup ratio [\d.]+\); 5 files, (\d+) new chunks",
        last,
    )
    assert summary and summary[1] == summary[2], last

    rc, screen, _ = run_on_terminal(["store", "put", "--store", store, "--key", KEY, str(src)])
    assert rc == 0, screen
    assert re.search(r"seq 2: 6\.0 MiB in .*uploaded 0 B, reused (\d+)/\1 chunks \(all reused\)", screen), screen

    dest = tmp_path / "dest"
    rc, screen, _ = run_on_terminal(["store", "get", "--store", store, "--key", KEY, str(dest)])
    assert rc == 0, screen
    assert LIVE_LINE.search(screen) and "download" in screen, screen
    assert re.search(
        rf"\rget {KEY} seq 2: 6\.0 MiB in [\d.]+s \([\d.]+ MiB/s\); restored 5 files into {dest}\n$", screen
    ), screen
    assert (dest / "sub" / "big.img").read_bytes() == (src / "sub" / "big.img").read_bytes()


def test_json_on_a_terminal_keeps_stdout_clean_and_sums_up_on_stderr(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    store = f"file://{tmp_path}/store"
    rc, screen, out = run_on_terminal(
        ["store", "put", "--json", "--store", store, "--key", KEY, str(src)], stdout_pipe=True
    )
    assert rc == 0, screen
    doc = json.loads(out)
    assert set(doc) == INFO_KEYS and doc["seq"] == 1 and doc["bytes_read"] == 6 * MIB
    assert "\r" not in out and LIVE_LINE.search(screen)
    assert screen.rstrip("\n").split("\r")[-1].startswith(f"put {KEY} seq 1: 6.0 MiB in "), screen


def test_without_a_terminal_progress_is_periodic_log_lines(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    store = f"file://{tmp_path}/store"
    put = run_piped(["store", "put", "--store", store, "--key", KEY, "--progress-interval", "0.001", str(src)])
    assert "\r" not in put.stdout and "\r" not in put.stderr
    lines = put.stderr.splitlines()
    assert all(line.startswith("INFO shim.progress: progress ") for line in lines), put.stderr
    uploads = [line for line in lines if "phase=upload" in line]
    assert len(uploads) >= 2, put.stderr
    done = [int(re.search(r"done_bytes=(\d+)", line)[1]) for line in uploads]  # type: ignore[index]
    assert done == sorted(done) and done[0] < done[-1] <= 6 * MIB
    assert all(re.search(r"total_bytes=6291456 rate_bps=\d+ eta_s=[\d.]+$", line) for line in uploads), uploads
    assert 'label="put default/mypod/main" phase=' in lines[0]
    assert re.fullmatch(
        r'INFO shim.progress: progress done label="put default/mypod/main seq 1" bytes=6291456 elapsed_s=[\d.]+ '
        r"rate_bps=\d+ uploaded_bytes=\d+ chunks_reused=0 chunks_total=\d+",
        lines[-1],
    ), lines[-1]
    assert put.stdout.startswith(f"put {KEY} seq 1: 6.0 MiB in ") and put.stdout.count("\n") == 1

    quiet = run_piped(["store", "put", "--store", store, "--key", KEY, "--progress-interval", "0", str(src)])
    assert quiet.stderr == "" and "seq 2" in quiet.stdout

    got = run_piped(
        ["store", "get", "--json", "--store", store, "--key", KEY, "--progress-interval", "0.001", str(tmp_path / "d")]
    )
    doc = json.loads(got.stdout)
    assert set(doc) == INFO_KEYS and doc["seq"] == 2 and "\r" not in got.stdout + got.stderr
    assert any("phase=download" in line for line in got.stderr.splitlines()), got.stderr
    assert got.stderr.splitlines()[-1].startswith('INFO shim.progress: progress done label="get default/mypod/main')
