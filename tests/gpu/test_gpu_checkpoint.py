"""CPU-only evidence for shim/gpu: a fake libcuda (tests/gpu/fake_libcuda.c, built here with gcc) with the
driver's per-process state machine and fault injection, and real child processes holding a fake device
file. These tests prove the call order, every recovery path, the timeouts, the no-libcuda path, process
discovery and the compatibility check. They are NOT evidence that real GPUs work: the real driver's
behaviour (timeout error code, what GetState says for a non-CUDA pid, restore after CRIU) is checked only
by tests/gpu/run_on_gpu.sh on a GPU machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harness.fakecuda import FakeCuda
from shim.gpu import (
    CudaDriver,
    CudaError,
    GpuCoordinator,
    GpuDumpHooks,
    GpuIncompatible,
    GpuQuiesceError,
    GpuResumeError,
    GpuRollbackError,
    GpuSession,
    GpuUnavailable,
    ProcessState,
    check_compatible,
    find_cuda_processes,
)
from shim.gpu.discovery import ProcRef

pytestmark = pytest.mark.timeout(120)


def steps(fc: FakeCuda) -> list[tuple[str, int]]:
    """(call, pid) of every checkpoint call, GetState left out, in order."""
    out = []
    for line in fc.calls():
        parts = line.split()
        if parts[0].startswith("cuCheckpointProcess"):
            out.append((parts[0].removeprefix("cuCheckpointProcess"), int(parts[1])))
    return out


# -- no libcuda ---------------------------------------------------------------------------------------------


def test_no_libcuda_leaves_cpu_containers_alone(fake_cuda: FakeCuda, tmp_path: Path) -> None:
    coord = fake_cuda.coordinator(libcuda=str(tmp_path / "missing" / "libcuda.so.1"))
    ok, reason = coord.available()
    assert not ok and reason.startswith("no GPU support: cannot load")
    plain = fake_cuda.spawn("plain")
    ran = []
    with coord.quiesced([plain.pid]) as session:
        assert not session.active
        ran.append(True)
        session.after_dump(leave_running=True)
    assert ran == [True]
    assert session.metadata()["cuda_processes"] == 0
    assert coord.resume_restored([plain.pid])["cuda_processes"] == 0
    assert coord.node_info()["available"] is False


def test_no_libcuda_refuses_to_dump_a_cuda_container(fake_cuda: FakeCuda, tmp_path: Path) -> None:
    coord = fake_cuda.coordinator(libcuda=str(tmp_path / "missing.so"))
    p = fake_cuda.spawn("fd")
    with pytest.raises(GpuQuiesceError, match="cannot checkpoint GPU state") as err, coord.quiesced([p.pid]):
        pytest.fail("the dump must not run")
    assert str(p.pid) in str(err.value)


def test_no_libcuda_refuses_restore_of_gpu_state(fake_cuda: FakeCuda, tmp_path: Path) -> None:
    coord = fake_cuda.coordinator(libcuda=str(tmp_path / "missing.so"))
    with pytest.raises(GpuUnavailable, match="no GPU support"):
        coord.resume_restored([os.getpid()], expected=1)


def test_library_without_checkpoint_api_is_no_gpu_support(fake_cuda: FakeCuda) -> None:
    libc = "libc.so.6"  # loads fine, exports none of the entry points
    with pytest.raises(GpuUnavailable, match="lacks cuCheckpointProcessGetState"):
        CudaDriver.load(libc)


def test_libcuda_path_from_environment(fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REVENANT_LIBCUDA", str(fake_cuda.lib))
    coord = GpuCoordinator(device_prefixes=(fake_cuda.prefix,))
    assert coord.available() == (True, None)
    assert coord.driver().path == str(fake_cuda.lib)


def test_cuinit_is_called_first_and_its_failure_means_no_gpu(fake_cuda: FakeCuda) -> None:
    fake_cuda.add_fault("init * fail 100 once")
    with pytest.raises(GpuUnavailable, match="cuInit failed: CUDA_ERROR_NO_DEVICE"):
        CudaDriver.load(str(fake_cuda.lib))
    drv = CudaDriver.load(str(fake_cuda.lib))  # the fault was used once
    p = fake_cuda.spawn("fd")
    assert drv.get_state(p.pid) is ProcessState.RUNNING
    calls = fake_cuda.calls(with_get_state=True)
    assert calls[0] == "cuInit 0 -> 100" and calls[1] == "cuInit 0 -> 0"
    assert calls[2].startswith("cuCheckpointProcessGetState")


# -- bindings against the state machine --------------------------------------------------------------------


def test_bindings_follow_the_state_machine_and_name_errors(fake_cuda: FakeCuda) -> None:
    drv = CudaDriver.load(str(fake_cuda.lib))
    p = fake_cuda.spawn("fd")
    drv.lock(p.pid, 1000)
    assert fake_cuda.state(p.pid) == "locked"
    with pytest.raises(CudaError) as e:
        drv.lock(p.pid, 1000)
    assert (e.value.code, e.value.name) == (401, "CUDA_ERROR_ILLEGAL_STATE")
    assert f"cuCheckpointProcessLock (pid {p.pid}) failed: CUDA_ERROR_ILLEGAL_STATE" in str(e.value)
    with pytest.raises(CudaError, match="ILLEGAL_STATE"):
        drv.restore(p.pid)  # restore needs CHECKPOINTED
    drv.checkpoint(p.pid)
    assert drv.get_state(p.pid) is ProcessState.CHECKPOINTED
    with pytest.raises(CudaError, match="ILLEGAL_STATE"):
        drv.unlock(p.pid)  # unlock needs LOCKED
    drv.restore(p.pid)
    assert drv.get_state(p.pid) is ProcessState.LOCKED
    drv.unlock(p.pid)
    assert drv.get_state(p.pid) is ProcessState.RUNNING
    plain = fake_cuda.spawn("plain")
    with pytest.raises(CudaError) as e:
        drv.get_state(plain.pid)
    assert e.value.name == "CUDA_ERROR_INVALID_VALUE"
    assert drv.error_name(12345) == "CUDA_ERROR_12345"
    assert f"cuCheckpointProcessLock {p.pid} 1000 -> 0" in fake_cuda.calls()  # timeoutMs reached the driver


# -- discovery ----------------------------------------------------------------------------------------------


def test_discovery_finds_processes_with_device_fds_or_maps(fake_cuda: FakeCuda) -> None:
    by_fd = fake_cuda.spawn("fd")
    by_map = fake_cuda.spawn("map")
    plain = fake_cuda.spawn("plain")
    threaded = fake_cuda.spawn("thread")
    tids = [int(t) for t in os.listdir(f"/proc/{threaded.pid}/task") if int(t) != threaded.pid]
    assert tids, "the threaded child should have a second thread"
    gone = fake_cuda.spawn("fd")
    fake_cuda.kill(gone)
    found = find_cuda_processes(
        [plain.pid, by_map.pid, by_fd.pid, threaded.pid, *tids, gone.pid, 999_999_999], (fake_cuda.prefix,)
    )
    assert [p.pid for p in found] == sorted([by_fd.pid, by_map.pid, threaded.pid])
    assert find_cuda_processes([by_fd.pid], ("/dev/nvidia",)) == []


def test_discovery_prefix_from_environment(fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch) -> None:
    p = fake_cuda.spawn("fd")
    monkeypatch.setenv("REVENANT_GPU_DEVICE_PREFIX", f"/nonexistent/x:{fake_cuda.prefix}")
    assert [r.pid for r in find_cuda_processes([p.pid])] == [p.pid]


def test_procref_detects_a_recycled_pid(fake_cuda: FakeCuda) -> None:
    p = fake_cuda.spawn("plain")
    ref = find_cuda_processes([p.pid], ("/",))[0]  # every process maps something under /
    assert ref.alive()
    assert not ProcRef(p.pid, ref.start_time + 1).alive()
    fake_cuda.kill(p)
    assert not ref.alive()


# -- the checkpoint flow ------------------------------------------------------------------------------------


def test_leave_running_dump_call_order_and_stats(fake_cuda: FakeCuda) -> None:
    a, b, plain = fake_cuda.spawn("fd"), fake_cuda.spawn("map"), fake_cuda.spawn("plain")
    coord = fake_cuda.coordinator()
    with coord.quiesced([plain.pid, b.pid, a.pid], lock_timeout_ms=1234) as session:
        assert session.active
        assert fake_cuda.state(a.pid) == fake_cuda.state(b.pid) == "checkpointed"  # what the dump sees
        session.after_dump(leave_running=True)
    x, y = sorted([a.pid, b.pid])
    assert steps(fake_cuda) == [
        ("Lock", x),
        ("Lock", y),
        ("Checkpoint", x),
        ("Checkpoint", y),
        ("Restore", x),
        ("Restore", y),
        ("Unlock", x),
        ("Unlock", y),
    ]
    assert f"cuCheckpointProcessLock {x} 1234 -> 0" in fake_cuda.calls()
    assert fake_cuda.state(a.pid) == fake_cuda.state(b.pid) == "running"
    assert fake_cuda.state(plain.pid) is None  # never touched
    meta = session.metadata()
    json.dumps(meta)  # goes into the checkpoint metadata as is
    assert meta["cuda_processes"] == 2 and meta["pids"] == [x, y]
    assert meta["node"]["models"] == ["Fake GPU"] and meta["node"]["driver_api_version"] == 13000
    st = meta["stats"]
    for key in ("lock_s", "checkpoint_s", "restore_s", "unlock_s"):
        assert st[key] >= 0 and all(key in st["per_process"][str(p)] for p in (x, y))
    assert st["gpu_bytes_source"] == "rss-growth" and st["gpu_bytes"] >= 0
    assert st["per_process"][str(x)]["rss_before_bytes"] > 0


def test_process_that_exits_before_its_lock_is_dropped(fake_cuda: FakeCuda) -> None:
    a, b = fake_cuda.spawn("fd"), fake_cuda.spawn("fd")
    coord = fake_cuda.coordinator()
    refs = coord.cuda_processes([a.pid, b.pid])
    fake_cuda.kill(b)  # exits between discovery and lock
    session = GpuSession(coord, refs, 1000)
    session._quiesce()
    assert [p.pid for p in session.processes] == [a.pid]
    assert f"{b.pid} exited before it could be locked" in session.events[0]
    session.after_dump(leave_running=True)
    assert fake_cuda.state(a.pid) == "running"


def test_dump_that_stops_the_container(fake_cuda: FakeCuda) -> None:
    a, b = fake_cuda.spawn("fd"), fake_cuda.spawn("fd")
    coord = fake_cuda.coordinator()
    with coord.quiesced([a.pid, b.pid]) as session:
        fake_cuda.kill(a)  # what runc checkpoint (without --leave-running) does to the container
        fake_cuda.kill(b)
        session.after_dump(leave_running=False)
    assert [s for s, _ in steps(fake_cuda)] == ["Lock", "Lock", "Checkpoint", "Checkpoint"]
    assert session.events == []


def test_survivor_of_a_stopping_dump_is_resumed(fake_cuda: FakeCuda) -> None:
    a = fake_cuda.spawn("fd")
    coord = fake_cuda.coordinator()
    with coord.quiesced([a.pid]) as session:
        session.after_dump(leave_running=False)  # but the process is still alive
    assert fake_cuda.state(a.pid) == "running"
    assert "survived" in session.events[0]


def test_leaving_the_block_without_after_dump_resumes(fake_cuda: FakeCuda) -> None:
    a = fake_cuda.spawn("fd")
    with fake_cuda.coordinator().quiesced([a.pid]):
        pass
    assert fake_cuda.state(a.pid) == "running"
    assert [s for s, _ in steps(fake_cuda)] == ["Lock", "Checkpoint", "Restore", "Unlock"]


# -- recovery paths -----------------------------------------------------------------------------------------


def two(fc: FakeCuda) -> tuple[int, int]:
    a, b = fc.spawn("fd"), fc.spawn("fd")
    return tuple(sorted([a.pid, b.pid]))  # type: ignore[return-value]


def test_lock_failure_unlocks_the_ones_already_locked(fake_cuda: FakeCuda) -> None:
    x, y = two(fake_cuda)
    fake_cuda.add_fault(f"lock {y} fail 2")
    with pytest.raises(GpuQuiesceError) as err, fake_cuda.coordinator().quiesced([x, y]):
        pytest.fail("the dump must not run")
    assert err.value.job_left_running
    assert err.value.failures[0].pid == y and err.value.failures[0].step == "lock"
    assert "CUDA_ERROR_OUT_OF_MEMORY" in str(err.value)
    assert steps(fake_cuda) == [("Lock", x), ("Lock", y), ("Unlock", x)]
    assert fake_cuda.state(x) == "running" and fake_cuda.state(y) == "running"


def test_checkpoint_failure_restores_and_unlocks_everyone(fake_cuda: FakeCuda) -> None:
    x, y = two(fake_cuda)
    fake_cuda.add_fault(f"checkpoint {y} fail 304")
    with (
        pytest.raises(GpuQuiesceError, match="CUDA_ERROR_OPERATING_SYSTEM") as err,
        fake_cuda.coordinator().quiesced([x, y]),
    ):
        pytest.fail("the dump must not run")
    assert err.value.job_left_running
    assert steps(fake_cuda) == [
        ("Lock", x),
        ("Lock", y),
        ("Checkpoint", x),
        ("Checkpoint", y),
        ("Restore", x),
        ("Unlock", x),
        ("Unlock", y),
    ]
    assert fake_cuda.state(x) == fake_cuda.state(y) == "running"


def test_checkpoint_failure_that_breaks_the_process_is_reported(fake_cuda: FakeCuda) -> None:
    x, y = two(fake_cuda)
    fake_cuda.add_fault(f"checkpoint {x} failstate 999")
    with pytest.raises(GpuQuiesceError, match="ROLLBACK FAILED") as err, fake_cuda.coordinator().quiesced([x, y]):
        pytest.fail("the dump must not run")
    assert not err.value.job_left_running
    assert [(f.pid, f.state_after) for f in err.value.rollback] == [(x, "FAILED")]
    assert fake_cuda.state(y) == "running"  # the other process was still returned to RUNNING


def test_rollback_when_the_state_cannot_be_read(fake_cuda: FakeCuda) -> None:
    x, y = two(fake_cuda)
    fake_cuda.add_fault(f"lock {y} fail 2")
    fake_cuda.add_fault(f"getstate {x} fail 999 once")  # the first GetState of the rollback fails
    with pytest.raises(GpuQuiesceError) as err, fake_cuda.coordinator().quiesced([x, y]):
        pytest.fail("the dump must not run")
    assert err.value.job_left_running
    # restore was tried blind (ILLEGAL_STATE: it was LOCKED, not CHECKPOINTED), then unlock ran.
    assert steps(fake_cuda) == [("Lock", x), ("Lock", y), ("Restore", x), ("Unlock", x)]
    assert fake_cuda.state(x) == fake_cuda.state(y) == "running"


def test_failed_dump_returns_every_process_to_running(fake_cuda: FakeCuda) -> None:
    x, y = two(fake_cuda)
    with pytest.raises(RuntimeError, match="runc checkpoint failed") as err, fake_cuda.coordinator().quiesced([x, y]):
        raise RuntimeError("runc checkpoint failed")
    assert any("restored and unlocked" in n for n in err.value.__notes__)
    assert fake_cuda.state(x) == fake_cuda.state(y) == "running"
    assert [s for s, _ in steps(fake_cuda)][-4:] == ["Restore", "Restore", "Unlock", "Unlock"]


def test_failed_dump_with_failed_restore_is_a_rollback_error(fake_cuda: FakeCuda) -> None:
    x, y = two(fake_cuda)
    fake_cuda.add_fault(f"restore {x} fail 2")
    with pytest.raises(GpuRollbackError) as err, fake_cuda.coordinator().quiesced([x, y]):
        raise RuntimeError("criu dump failed")
    assert isinstance(err.value.__cause__, RuntimeError)
    assert [(f.pid, f.step, f.state_after) for f in err.value.rollback] == [(x, "restore", "CHECKPOINTED")]
    assert "CUDA_ERROR_OUT_OF_MEMORY" in str(err.value)
    assert fake_cuda.state(y) == "running"


def test_restore_failure_after_leave_running_dump(fake_cuda: FakeCuda) -> None:
    x, y = two(fake_cuda)
    fake_cuda.add_fault(f"restore {y} fail 2")
    with fake_cuda.coordinator().quiesced([x, y]) as session, pytest.raises(GpuResumeError) as err:
        session.after_dump(leave_running=True)
    assert [(f.pid, f.step, f.state_after) for f in err.value.failures] == [(y, "restore", "CHECKPOINTED")]
    assert fake_cuda.state(x) == "running"


def test_transient_restore_failure_is_retried(fake_cuda: FakeCuda) -> None:
    x, y = two(fake_cuda)
    fake_cuda.add_fault(f"restore {y} fail 2 once")
    with fake_cuda.coordinator().quiesced([x, y]) as session:
        session.after_dump(leave_running=True)
    assert fake_cuda.state(x) == fake_cuda.state(y) == "running"
    assert [c for c in fake_cuda.calls() if c.startswith(f"cuCheckpointProcessRestore {y}")] == [
        f"cuCheckpointProcessRestore {y} -> 2",
        f"cuCheckpointProcessRestore {y} -> 0",
    ]


def test_unlock_failure_after_leave_running_dump(fake_cuda: FakeCuda) -> None:
    x, y = two(fake_cuda)
    fake_cuda.add_fault(f"unlock {x} fail 999")
    with fake_cuda.coordinator().quiesced([x, y]) as session, pytest.raises(GpuResumeError) as err:
        session.after_dump(leave_running=True)
    assert [(f.pid, f.step, f.state_after) for f in err.value.failures] == [(x, "unlock", "LOCKED")]
    assert fake_cuda.state(y) == "running"


# -- timeouts -----------------------------------------------------------------------------------------------


def test_lock_timeout_leaves_the_job_running(fake_cuda: FakeCuda) -> None:
    x, y = two(fake_cuda)
    fake_cuda.add_fault(f"lock {y} delay 60000")  # the process would need a minute to reach a lockable point
    with (
        pytest.raises(GpuQuiesceError, match="CUDA_ERROR_TIMEOUT") as err,
        fake_cuda.coordinator().quiesced([x, y], lock_timeout_ms=300),
    ):
        pytest.fail("the dump must not run")
    assert err.value.job_left_running
    assert f"cuCheckpointProcessLock {y} 300 -> 909" in fake_cuda.calls()
    assert fake_cuda.state(x) == fake_cuda.state(y) == "running"


def test_lock_that_ignores_its_timeout_is_abandoned_and_undone_later(fake_cuda: FakeCuda) -> None:
    x, y = two(fake_cuda)
    fake_cuda.add_fault(f"lock {y} stall 2000")  # a driver call that does not honour timeoutMs
    coord = fake_cuda.coordinator(lock_grace_s=0.2)
    with (
        pytest.raises(GpuQuiesceError, match="did not return within") as err,
        coord.quiesced([x, y], lock_timeout_ms=100),
    ):
        pytest.fail("the dump must not run")
    assert err.value.failures[0].pid == y
    assert fake_cuda.state(x) == "running"
    assert coord.wait_for_stuck_calls(timeout_s=30)
    # The stalled lock did take effect when it returned; the background thread unlocked it.
    assert [c for c in steps(fake_cuda) if c[1] == y] == [("Lock", y), ("Unlock", y)]
    assert fake_cuda.state(y) == "running"


def test_stuck_restore_after_dump_is_reported_and_finished_later(fake_cuda: FakeCuda) -> None:
    (x,) = [fake_cuda.spawn("fd").pid]
    fake_cuda.add_fault(f"restore {x} stall 3000 once")
    coord = fake_cuda.coordinator(call_timeout_s=1.0)
    with coord.quiesced([x]) as session, pytest.raises(GpuResumeError, match="did not return") as err:
        session.after_dump(leave_running=True)
    assert "background thread" in str(err.value)
    assert coord.wait_for_stuck_calls(timeout_s=30)
    assert fake_cuda.state(x) == "running"


# -- after runc/criu restore --------------------------------------------------------------------------------


def test_resume_restored_processes(fake_cuda: FakeCuda) -> None:
    # A CRIU-restored CUDA process holds no device file; the driver knows it as CHECKPOINTED.
    a, b, plain = fake_cuda.spawn("plain"), fake_cuda.spawn("plain"), fake_cuda.spawn("plain")
    fake_cuda.set_state(a.pid, "checkpointed")
    fake_cuda.set_state(b.pid, "checkpointed")
    report = fake_cuda.coordinator().resume_restored([plain.pid, a.pid, b.pid], expected=2)
    assert report["cuda_processes"] == 2 and report["pids"] == sorted([a.pid, b.pid])
    assert fake_cuda.state(a.pid) == fake_cuda.state(b.pid) == "running"
    x, y = sorted([a.pid, b.pid])
    assert steps(fake_cuda) == [("Restore", x), ("Restore", y), ("Unlock", x), ("Unlock", y)]
    json.dumps(report, default=str)


def test_resume_restored_count_mismatch(fake_cuda: FakeCuda) -> None:
    a = fake_cuda.spawn("plain")
    fake_cuda.set_state(a.pid, "checkpointed")
    with pytest.raises(GpuResumeError, match="held 2 CUDA process"):
        fake_cuda.coordinator().resume_restored([a.pid], expected=2)
    assert fake_cuda.state(a.pid) == "running"  # the one found was still resumed


def test_resume_restored_restore_failure(fake_cuda: FakeCuda) -> None:
    a = fake_cuda.spawn("plain")
    fake_cuda.set_state(a.pid, "checkpointed")
    fake_cuda.add_fault(f"restore {a.pid} fail 2")
    with pytest.raises(GpuResumeError, match="CUDA_ERROR_OUT_OF_MEMORY") as err:
        fake_cuda.coordinator().resume_restored([a.pid], expected=1)
    assert err.value.failures[0].state_after == "CHECKPOINTED"


def test_resume_restored_cpu_container(fake_cuda: FakeCuda) -> None:
    plain = fake_cuda.spawn("plain")
    assert fake_cuda.coordinator().resume_restored([plain.pid], expected=0)["cuda_processes"] == 0
    assert steps(fake_cuda) == []


# -- compatibility ------------------------------------------------------------------------------------------


def checkpoint_metadata(fc: FakeCuda, monkeypatch: pytest.MonkeyPatch, devices: str) -> dict:
    monkeypatch.setenv("FAKE_CUDA_DEVICES", devices)
    p = fc.spawn("fd")
    with fc.coordinator().quiesced([p.pid]) as session:
        session.after_dump(leave_running=True)
    return json.loads(json.dumps(session.metadata()))  # as stored and read back


def test_compatibility_check(fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    h100 = "NVIDIA H100 80GB HBM3"
    saved = checkpoint_metadata(fake_cuda, monkeypatch, f"{h100},{h100}")
    assert saved["node"]["count"] == 2 and saved["node"]["devices"][1]["uuid"].startswith("GPU-")

    def node(devices: str) -> dict:
        monkeypatch.setenv("FAKE_CUDA_DEVICES", devices)
        return fake_cuda.coordinator().node_info()

    assert check_compatible(saved, node(f"{h100},{h100}")).ok
    one = check_compatible(saved, node(h100))
    assert not one and one.reason == (
        f"GPU count differs: the checkpoint was taken on 2 x {h100}, this node has 1 x {h100}"
    )
    other = check_compatible(saved, node("NVIDIA H200,NVIDIA H200"))
    assert not other and other.reason.startswith("GPU model differs") and "2 x NVIDIA H200" in other.reason
    none = check_compatible(saved, fake_cuda.coordinator(libcuda=str(tmp_path / "no.so")).node_info())
    assert not none and "this node has no GPU support" in none.reason
    cpu_only = {"cuda_processes": 0, "node": None}
    assert check_compatible(cpu_only, (none and {}) or {"available": False}).ok
    assert check_compatible(None, node("")).ok


# -- the checkpoint engine's hooks --------------------------------------------------------------------------


def test_dump_hooks_leave_running_and_metadata(fake_cuda: FakeCuda) -> None:
    x, y = two(fake_cuda)
    hooks = GpuDumpHooks(lambda cid: {"job": [x, y]}[cid], fake_cuda.coordinator())
    hooks.before_dump("job")
    assert fake_cuda.state(x) == fake_cuda.state(y) == "checkpointed"
    hooks.after_dump("job", leave_running=True, failed=False)
    assert fake_cuda.state(x) == fake_cuda.state(y) == "running"
    meta = hooks.take_metadata("job")
    assert meta is not None and meta["cuda_processes"] == 2


def test_dump_hooks_failed_dump_and_cpu_container(fake_cuda: FakeCuda) -> None:
    x, y = two(fake_cuda)
    plain = fake_cuda.spawn("plain").pid
    hooks = GpuDumpHooks(lambda cid: {"gpu": [x, y], "cpu": [plain]}[cid], fake_cuda.coordinator())
    hooks.before_dump("gpu")
    hooks.after_dump("gpu", leave_running=False, failed=True)
    assert fake_cuda.state(x) == fake_cuda.state(y) == "running"
    assert hooks.take_metadata("gpu") is None
    hooks.before_dump("cpu")
    hooks.after_dump("cpu", leave_running=True, failed=False)
    assert hooks.take_metadata("cpu") is None  # nothing GPU to record
    assert fake_cuda.state(plain) is None


def test_dump_hooks_restore_checks_the_node_first(fake_cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = checkpoint_metadata(fake_cuda, monkeypatch, "NVIDIA H100 80GB HBM3")
    a = fake_cuda.spawn("plain").pid
    fake_cuda.set_state(a, "checkpointed")  # as CRIU restores it
    hooks = GpuDumpHooks(lambda cid: [a], fake_cuda.coordinator())
    monkeypatch.setenv("FAKE_CUDA_DEVICES", "NVIDIA A100-SXM4-80GB")
    with pytest.raises(GpuIncompatible, match="refusing to restore here: GPU model differs"):
        hooks.expect_restore("job", saved)
    monkeypatch.setenv("FAKE_CUDA_DEVICES", "NVIDIA H100 80GB HBM3")
    hooks.expect_restore("job", saved)
    hooks.after_restore("job")
    assert hooks.restore_reports["job"]["cuda_processes"] == 1
    assert fake_cuda.state(a) == "running"
