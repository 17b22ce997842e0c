"""Lazy restore with real CRIU: `criu lazy-pages` fed by our page server, the images dir holding holes
where the lazy pages go, the pages themselves read from a copy of the full pages file.

The proof that memory came back is memjob's: every step checksums all its pages, and the checksum after
step N must be what replaying N steps on the host gives; SIGUSR1 regenerates every page and compares.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import images
from harness.lazy_images import FileSource, sparse_copy
from harness.memjob import LOG_IN_CONTAINER, expected_checksum, memjob_args, read_steps, wait_for_step
from harness.tools import require
from harness.wait import wait_until
from shim.checkpoint.lazy_daemon import LazyPagesError, start_lazy_pages
from shim.checkpoint.lazy_pages import LazyPlan, lazy_plan
from shim.libc import PR_SET_CHILD_SUBREAPER, set_child_subreaper

pytestmark = pytest.mark.timeout(300)

MIB = 64
SEED = 5


def assert_holes(images_dir: Path, plan: LazyPlan) -> None:
    lazy_bytes = 0
    for name, ranges in plan.ranges.items():
        with open(images_dir / name, "rb") as f:
            for offset, length in ranges:
                try:
                    data_at = os.lseek(f.fileno(), offset, os.SEEK_DATA)
                except OSError:  # ENXIO: nothing but holes up to the end
                    data_at = offset + length
                assert data_at >= offset + length, f"{name}: data at {data_at} inside lazy range {offset}+{length}"
                lazy_bytes += length
    assert lazy_bytes >= MIB << 20  # the job's buffer is among the lazy pages


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Restored trees are re-parented to this process, so their end (SIGKILL or a crash) can be read."""
    set_child_subreaper()
    yield
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@pytest.fixture
def dumped(test_images: images.TestImages, tmp_path: Path, subreaper: None) -> Iterator[tuple[Path, Path, int]]:
    """A memjob dumped by `criu dump` (it is gone afterwards): (images dir, its log, its last step)."""
    if os.geteuid() != 0:
        pytest.skip("criu needs root")
    criu = require("criu", "criu")
    log = tmp_path / "memjob.log"
    args = [*memjob_args(MIB, SEED, interval_ms=300)[1:-1], str(log)]
    proc = subprocess.Popen(
        [str(test_images.memjob_binary), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    full = tmp_path / "full"
    full.mkdir()
    try:
        wait_for_step(log, 2)
        subprocess.run([criu, "dump", "-t", str(proc.pid), "-D", str(full), "-o", "dump.log"], check=True)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    yield full, log, read_steps(log)[-1].n


def criu_restore(images_dir: Path, work: Path) -> int:
    pidfile = work / "restored.pid"
    subprocess.run(
        [require("criu", "criu"), "restore", "-D", str(images_dir), "--work-dir", str(work), "--lazy-pages", "-d",
         "-o", "restore.log", "--pidfile", str(pidfile)],
        check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return int(pidfile.read_text())


def test_lazy_restore_gets_the_lazy_pages_from_the_page_server(
    dumped: tuple[Path, Path, int], tmp_path: Path, test_images: images.TestImages
) -> None:
    full, log, step = dumped
    plan = lazy_plan(full)
    restore_dir, work = tmp_path / "restore", tmp_path / "work"
    sparse_copy(full, restore_dir, plan)
    assert_holes(restore_dir, plan)
    source, failures = FileSource(full), list[str]()
    daemon = start_lazy_pages(restore_dir, work, plan, source, failures.append)
    pid = criu_restore(restore_dir, work)
    try:
        stats = daemon.wait(120)
        assert (stats.pages, failures) == (plan.total_pages, [])
        steps = wait_for_step(log, step + 2)
        assert all(s.checksum == expected_checksum(test_images.memjob_binary, MIB, SEED, s.n) for s in steps[-2:])
        os.kill(pid, signal.SIGUSR1)  # regenerate every page and compare
        verdict = wait_until(
            lambda: next((x for x in log.read_text().splitlines() if "verify=" in x), None), 60, "verify"
        )
        assert verdict.startswith("verify=ok"), verdict
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        daemon.kill()


def test_a_failing_source_kills_the_restored_process_first(dumped: tuple[Path, Path, int], tmp_path: Path) -> None:
    full, log, step = dumped
    plan = lazy_plan(full)
    restore_dir, work = tmp_path / "restore", tmp_path / "work"
    sparse_copy(full, restore_dir, plan)
    restored: list[int] = []
    failures: list[str] = []

    def on_failure(reason: str) -> None:  # what the shim does: kill the container, then let the daemon go
        failures.append(reason)
        wait_until(lambda: restored, 30, "the restored pid")
        os.kill(restored[0], signal.SIGKILL)

    daemon = start_lazy_pages(restore_dir, work, plan, FileSource(full, fail_after=5), on_failure)
    try:
        restored.append(criu_restore(restore_dir, work))
        with pytest.raises(LazyPagesError, match="store stopped answering"):
            daemon.wait(120)
        status = wait_until(lambda: os.waitpid(restored[0], os.WNOHANG)[1], 30, "the restored process's end")
    finally:
        daemon.kill()
    # Killed by us, not crashed on a zero page after the daemon's userfaultfd went away (what happens
    # without on_failure: the kernel hands out zero pages, here a zeroed stack: SIGSEGV at ip 0).
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    assert len(failures) == 1 and "store stopped answering" in failures[0]
    assert read_steps(log)[-1].n == step  # it never got to report another checksum


def test_a_daemon_dying_mid_transfer_kills_the_restored_process(dumped: tuple[Path, Path, int], tmp_path: Path) -> None:
    full, log, step = dumped
    plan = lazy_plan(full)
    restore_dir, work = tmp_path / "restore", tmp_path / "work"
    sparse_copy(full, restore_dir, plan)
    restored: list[int] = []
    failures: list[str] = []
    daemon_pid: list[int] = []

    class KillsTheDaemon(FileSource):
        def read(self, name: str, offset: int, length: int) -> bytes:
            if self.reads == 5:
                os.kill(daemon_pid[0], signal.SIGKILL)
            return super().read(name, offset, length)

    def on_failure(reason: str) -> None:
        failures.append(reason)
        wait_until(lambda: restored, 30, "the restored pid")
        os.kill(restored[0], signal.SIGKILL)

    daemon = start_lazy_pages(restore_dir, work, plan, KillsTheDaemon(full), on_failure)
    daemon_pid.append(daemon.proc.pid)
    try:
        restored.append(criu_restore(restore_dir, work))
        with pytest.raises(LazyPagesError):
            daemon.wait(120)
        status = wait_until(lambda: os.waitpid(restored[0], os.WNOHANG)[1], 30, "the restored process's end")
    finally:
        daemon.kill()
    # Killed by on_failure; or, under load, crashed first on the zero pages the kernel gives once the dead
    # daemon's userfaultfds are closed (nothing can hold the faults past its death: docs/security.md).
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) in (signal.SIGKILL, signal.SIGSEGV, signal.SIGBUS), status
    assert len(failures) == 1, failures  # the server and the daemon watcher both noticed; one call
    assert read_steps(log)[-1].n == step


def test_without_on_failure_the_process_goes_on_with_zero_pages(
    dumped: tuple[Path, Path, int], tmp_path: Path, test_images: images.TestImages
) -> None:
    """Why on_failure must kill: CRIU's daemon gives up when the page server goes away, its userfaultfd
    closes, and the kernel fills the remaining faults with zero pages. The job then crashes (a zeroed stack)
    or, worse, runs on and reports checksums of wrong memory. (Pins CRIU 4.1's behaviour: if a later CRIU
    kills the tree itself, this test says so.)"""
    full, log, step = dumped
    plan = lazy_plan(full)
    restore_dir, work = tmp_path / "restore", tmp_path / "work"
    sparse_copy(full, restore_dir, plan)
    daemon = start_lazy_pages(restore_dir, work, plan, FileSource(full, fail_after=40), lambda reason: None)
    pid = criu_restore(restore_dir, work)
    reaped: list[int] = []
    try:
        with pytest.raises(LazyPagesError):
            daemon.wait(120)

        def outcome() -> str | None:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                reaped.append(pid)
                return f"died of signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {status}"
            later = [s for s in read_steps(log) if s.n > step]
            return f"ran on to step {later[0].n}" if later else None

        seen = wait_until(outcome, 60, "the restored job to crash or run on")
    finally:
        if not reaped:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        daemon.kill()
    if seen.startswith("ran on"):
        first = next(s for s in read_steps(log) if s.n > step)
        assert first.checksum != expected_checksum(test_images.memjob_binary, MIB, SEED, first.n), seen
    else:
        assert seen == f"died of signal {signal.SIGSEGV}", seen


class Bundle:
    """A runc bundle running memjob in the busybox-based memjob image."""

    def __init__(self, base: Path, archive: Path) -> None:
        self.dir, self.root, self.runc = base / "bundle", base / "runc", require("runc", "runc")
        images.extract_rootfs(archive, self.dir / "rootfs")
        subprocess.run([self.runc, "spec", "--bundle", str(self.dir)], check=True)
        config = json.loads((self.dir / "config.json").read_text())
        config["process"].update(terminal=False, args=memjob_args(MIB, SEED, interval_ms=300))
        config["root"]["readonly"] = False
        (self.dir / "config.json").write_text(json.dumps(config))
        self.log = self.dir / "rootfs" / LOG_IN_CONTAINER.lstrip("/")

    def runc_run(self, *args: str) -> None:
        subprocess.run(
            [self.runc, "--root", str(self.root), *args],
            check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def status(self, cid: str) -> str | None:
        res = subprocess.run([self.runc, "--root", str(self.root), "state", cid], capture_output=True, text=True)
        return json.loads(res.stdout)["status"] if res.returncode == 0 else None

    def destroy(self) -> None:
        ids = subprocess.run([self.runc, "--root", str(self.root), "list", "-q"], capture_output=True, text=True)
        for cid in ids.stdout.split():
            subprocess.run([self.runc, "--root", str(self.root), "delete", "-f", cid], capture_output=True)


@pytest.mark.parametrize("fail_after", [None, 5], ids=["all-pages", "source-fails"])
def test_runc_restore_lazy_pages_with_our_page_server(
    test_images: images.TestImages, tmp_path: Path, fail_after: int | None
) -> None:
    if os.geteuid() != 0:
        pytest.skip("runc checkpoint needs root")
    require("criu", "criu")
    bundle = Bundle(tmp_path, test_images.memjob)
    full, restore_dir, work = tmp_path / "full", tmp_path / "restore", tmp_path / "work"
    daemon = None
    failures: list[str] = []

    def on_failure(reason: str) -> None:  # the shim's: kill the container before the daemon lets go
        failures.append(reason)
        subprocess.run([bundle.runc, "--root", str(bundle.root), "kill", "job", "KILL"], check=True)

    try:
        bundle.runc_run("run", "-d", "--bundle", str(bundle.dir), "job")
        wait_for_step(bundle.log, 2)
        bundle.runc_run("checkpoint", "--image-path", str(full), "--work-path", str(tmp_path / "dump-work"), "job")
        step = read_steps(bundle.log)[-1].n
        plan = lazy_plan(full)
        assert list(plan.extents) == [1]  # the container's init, pid 1 in its namespace
        sparse_copy(full, restore_dir, plan)
        daemon = start_lazy_pages(restore_dir, work, plan, FileSource(full, fail_after), on_failure)
        bundle.runc_run(
            "restore", "-d", "--lazy-pages", "--image-path", str(restore_dir), "--work-path", str(work),
            "--bundle", str(bundle.dir), "job",
        )  # fmt: skip
        if fail_after is not None:
            with pytest.raises(LazyPagesError, match="store stopped answering"):
                daemon.wait(120)
            wait_until(lambda: bundle.status("job") == "stopped", 30, "the container stopped")
            assert len(failures) == 1 and read_steps(bundle.log)[-1].n == step
            return
        stats = daemon.wait(120)
        assert (stats.pages, failures) == (plan.total_pages, [])
        steps = wait_for_step(bundle.log, step + 2)
        assert all(s.checksum == expected_checksum(test_images.memjob_binary, MIB, SEED, s.n) for s in steps[-2:])
        assert [s.n for s in steps] == list(range(1, steps[-1].n + 1))  # resumed, not restarted
    finally:
        if daemon is not None:
            daemon.kill()
        bundle.destroy()
