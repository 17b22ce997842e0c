"""The checkpoint engine against real runc + CRIU on a plain OCI bundle (no containerd in the way).

Proves: leave-running and exit dumps with CRIU statistics, a restore that goes on with the exact
memory state (memjob --replay), serialized concurrent checkpoints, and failures that name CRIU's
error and keep its log while leaving nothing behind.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest

from harness.images import extract_rootfs
from harness.memjob import expected_checksum
from harness.tools import require
from harness.wait import wait_until
from shim.checkpoint import CheckpointEngine, CheckpointError, CheckpointOptions, RestoreOptions
from shim.runc.driver import IOFds, Runc

MIB, SEED = 32, 5


class Bundle:
    """A runc bundle running memjob with its stdout on a pipe the test reads."""

    def __init__(self, base: Path, rootfs_archive: Path, runc: str) -> None:
        self.dir = base / "bundle"
        self.root = base / "runc"
        self.runc = runc
        extract_rootfs(rootfs_archive, self.dir / "rootfs")
        subprocess.run([runc, "spec", "--bundle", str(self.dir)], check=True)
        config = json.loads((self.dir / "config.json").read_text())
        config["process"]["terminal"] = False
        config["process"]["args"] = ["/bin/memjob", "--mib", str(MIB), "--seed", str(SEED), "--interval-ms", "100"]
        config["root"]["readonly"] = False
        (self.dir / "config.json").write_text(json.dumps(config))
        self.outputs: dict[str, list[str]] = {}
        self.driver = Runc(root=str(self.root), log_path=str(base / "runc.log"), binary=runc)

    def _reader(self, name: str, stream) -> None:
        lines = self.outputs.setdefault(name, [])
        for raw in iter(stream.readline, b""):
            lines.append(raw.decode().strip())

    def pipe_for(self, name: str) -> int:
        """A pipe whose read end a thread drains into self.outputs[name]; returns the write end."""
        import os

        r, w = os.pipe()
        threading.Thread(target=self._reader, args=(name, os.fdopen(r, "rb")), daemon=True).start()
        return w

    def run(self, cid: str) -> None:
        import os

        w = self.pipe_for(cid)
        subprocess.run(
            [self.runc, "--root", str(self.root), "run", "-d", "--bundle", str(self.dir), cid],
            stdin=subprocess.DEVNULL,
            stdout=w,
            stderr=w,
            check=True,
        )
        os.close(w)

    def steps(self, name: str) -> list[tuple[int, str]]:
        out = []
        for line in self.outputs.get(name, []):
            if line.startswith("step="):
                n, c = line.split()
                out.append((int(n[5:]), c[9:]))
        return out

    def wait_steps(self, name: str, at_least: int) -> list[tuple[int, str]]:
        return wait_until(lambda: (s := self.steps(name)) and s[-1][0] >= at_least and s, 60, f"{name} step {at_least}")

    def status(self, cid: str) -> str | None:
        res = subprocess.run([self.runc, "--root", str(self.root), "state", cid], capture_output=True, text=True)
        return json.loads(res.stdout)["status"] if res.returncode == 0 else None

    def destroy(self) -> None:
        res = subprocess.run([self.runc, "--root", str(self.root), "list", "-q"], capture_output=True, text=True)
        for cid in res.stdout.split():
            subprocess.run([self.runc, "--root", str(self.root), "delete", "-f", cid], capture_output=True)


@pytest.fixture
def bundle(tmp_path, test_images):
    require("criu", "criu (>= 4, see packaging/install-deps.sh)")
    b = Bundle(tmp_path, test_images.memjob, require("runc", "runc"))
    yield b
    b.destroy()


@pytest.fixture
def engine():
    return CheckpointEngine()


def test_leave_running_checkpoint_reports_criu_statistics(bundle, engine, tmp_path):
    bundle.run("job")
    bundle.wait_steps("job", 3)
    result = engine.checkpoint(bundle.driver, "job", tmp_path / "image", CheckpointOptions())
    assert bundle.status("job") == "running"
    assert list((tmp_path / "image").glob("pages-*.img")), "no memory pages in the image"
    assert result.stats is not None
    assert result.stats.frozen_time_us > 0
    assert result.stats.pages_written >= MIB * 256  # every page of the job's state was written
    assert result.image_bytes >= MIB * 2**20
    n = bundle.steps("job")[-1][0]
    bundle.wait_steps("job", n + 2)  # it kept running


def test_restore_goes_on_with_the_exact_memory_state(bundle, engine, tmp_path, test_images):
    bundle.run("job")
    bundle.wait_steps("job", 3)
    engine.checkpoint(bundle.driver, "job", tmp_path / "image", CheckpointOptions(exit=True))
    assert bundle.status("job") is None or bundle.status("job") == "stopped"
    dumped_at = bundle.steps("job")[-1][0]
    subprocess.run([bundle.runc, "--root", str(bundle.root), "delete", "-f", "job"], check=True)

    out = bundle.pipe_for("restored")
    result = engine.restore(
        bundle.driver,
        "restored",
        bundle.dir,
        tmp_path / "image",
        RestoreOptions(),
        pid_file=tmp_path / "restored.pid",
        io=IOFds(None, out, out),
        work_path=tmp_path / "rwork",
    )
    assert result.pid > 0
    assert bundle.status("restored") == "running"
    steps = bundle.wait_steps("restored", dumped_at + 3)
    assert steps[0][0] == dumped_at + 1, f"restored job did not continue from step {dumped_at}: {steps[:3]}"
    for n, checksum in (steps[0], steps[-1]):
        assert checksum == expected_checksum(test_images.memjob_binary, MIB, SEED, n, mutate=0.05)


def test_concurrent_checkpoints_of_one_task_are_serialized(bundle, engine, tmp_path):
    bundle.run("job")
    bundle.wait_steps("job", 2)
    errors: list[BaseException] = []

    def dump(i: int) -> None:
        try:
            engine.checkpoint(bundle.driver, "job", tmp_path / f"image{i}", CheckpointOptions())
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=dump, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(list((tmp_path / f"image{i}").glob("pages-*.img")) for i in range(3))


def test_failed_dump_names_criu_error_and_keeps_log(bundle, engine, tmp_path):
    # A stdout on a host file that the container cannot see is a classic CRIU refusal.
    host_file = open(tmp_path / "outside.log", "wb")  # noqa: SIM115 - handed to runc
    subprocess.run(
        [bundle.runc, "--root", str(bundle.root), "run", "-d", "--bundle", str(bundle.dir), "job"],
        stdin=subprocess.DEVNULL,
        stdout=host_file,
        stderr=host_file,
        check=True,
    )
    host_file.close()
    keep = tmp_path / "kept"
    with pytest.raises(CheckpointError) as exc:
        engine.checkpoint(bundle.driver, "job", tmp_path / "image", CheckpointOptions(), keep_log_in=keep)
    assert "Can't lookup mount" in str(exc.value) or "Dump files" in str(exc.value), str(exc.value)
    assert "RLIMIT_NOFILE" not in str(exc.value)
    assert exc.value.log_path == keep / "criu-dump.log" and exc.value.log_path.stat().st_size > 0
    assert bundle.status("job") == "running", "a failed leave-running dump must leave the task running"


def test_restore_from_garbage_fails_cleanly(bundle, engine, tmp_path):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "inventory.img").write_bytes(b"\x00not an image" * 100)
    (garbage / "pages-1.img").write_bytes(b"\xff" * 8192)
    with pytest.raises(CheckpointError) as exc:
        engine.restore(
            bundle.driver,
            "ghost",
            bundle.dir,
            garbage,
            RestoreOptions(),
            pid_file=tmp_path / "ghost.pid",
            io=IOFds(),
            work_path=tmp_path / "gwork",
            keep_log_in=tmp_path / "kept",
        )
    assert "restore of ghost failed" in str(exc.value)
    assert bundle.status("ghost") is None, "a failed restore left a container behind"


@pytest.mark.parametrize("when", ["criu-asks", "job-asks"])
def test_lazy_pages_failing_inside_the_restore_leave_nothing_for_the_retry(bundle, engine, tmp_path, test_images, when):
    """A lazy page fails (a damaged chunk) before the restore is over: asked for by CRIU itself (its restore
    fails), or by the restored job before the shim has seen `runc restore` return. Either way the restore
    fails and leaves neither the container nor the lazy-pages daemon (it exits once the page server hangs
    up), so the fallback (an older checkpoint, here the same images from a good source) restores under the
    same id and work dir."""
    from harness.lazy_images import FileSource, sparse_copy
    from shim.checkpoint.lazy_pages import lazy_plan
    from shim.checkpoint.lazy_restore import LazyRestore

    bundle.run("job")
    bundle.wait_steps("job", 3)
    full = tmp_path / "image"
    engine.checkpoint(bundle.driver, "job", full, CheckpointOptions(exit=True))
    dumped_at = bundle.steps("job")[-1][0]
    subprocess.run([bundle.runc, "--root", str(bundle.root), "delete", "-f", "job"], check=True)
    sparse = tmp_path / "sparse"
    sparse_copy(full, sparse, lazy_plan(full))

    class Damaged(FileSource):
        """Fails every read once armed (from the first one for criu-asks)."""

        armed, failed = when == "criu-asks", False

        def read(self, name: str, offset: int, length: int) -> bytes:
            if self.armed:
                self.failed = True
                raise OSError("the store stopped answering")
            return super().read(name, offset, length)

    damaged = Damaged(full)

    class SlowToReturn(Runc):
        """runc, whose restore returns only once the restored job's next page request has failed."""

        def restore(self, cid, args, io):
            super().restore(cid, args, io)
            damaged.armed = True
            wait_until(lambda: damaged.failed, 60, "a page request from the restored job")

    late = SlowToReturn(root=str(bundle.root), log_path=str(tmp_path / "runc.log"), binary=bundle.runc)
    ends: list[str | None] = []
    work = tmp_path / "rwork"

    def restore(runc: Runc, source: FileSource):
        out = bundle.pipe_for("restored")
        return engine.restore(
            runc, "restored", bundle.dir, sparse, RestoreOptions(), pid_file=tmp_path / "restored.pid",
            io=IOFds(None, out, out), work_path=work, lazy=LazyRestore(source, ends.append),
        )  # fmt: skip

    expected = "Restoring FAILED" if when == "criu-asks" else "lazy pages failed during the restore"
    with pytest.raises(CheckpointError, match=expected):
        restore(late, damaged)
    assert damaged.failed
    assert bundle.status("restored") is None, "the failed lazy restore left its container behind"
    assert len(ends) == 1 and ends[0] is not None
    ps = subprocess.run(["pgrep", "-f", f"lazy-pages -D {sparse}"], capture_output=True, text=True)
    assert ps.stdout.strip() == "", "the failed restore's criu lazy-pages is still running"

    restore(bundle.driver, FileSource(full))
    steps = bundle.wait_steps("restored", dumped_at + 3)
    assert steps[0][0] == dumped_at + 1, steps[:3]
    assert steps[-1][1] == expected_checksum(test_images.memjob_binary, MIB, SEED, steps[-1][0], mutate=0.05)
    wait_until(lambda: len(ends) > 1, 120, "the retry's last lazy page")
    assert ends[1:] == [None]  # every page of the retry arrived
