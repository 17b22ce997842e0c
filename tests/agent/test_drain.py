"""The drain fan-out against stand-in shims.

The stand-ins (see conftest.py) are real shim.ttrpc servers on unix sockets that implement
revenant.v1.Control as docs/control.md describes: "ok" answers like a checkpoint, "fail" answers an
error, "hang" never answers before the deadline: failures and hangs a real shim cannot be made to show on
cue, in seconds. tests/protect drives the agent against real shims end to end.
"""

from __future__ import annotations

import time

from shim.agent.drain import FAILED, OK, TIMED_OUT, drain, plan_deadline
from shim.protect.registry import TaskRecord, list_tasks, write_task


def test_every_registered_task_is_checkpointed_concurrently_and_reported(standins, run_dir) -> None:
    a = standins.add("job-a")
    b = standins.add("job-b", namespace="k8s.io")
    bad = standins.add("job-bad", behavior="fail")
    hung = standins.add("job-hung", behavior="hang")
    stranger = standins.add("unprotected", register=False)  # a shim whose task is not in the registry
    notice_deadline = time.time() + 5
    deadline = plan_deadline(notice_deadline)
    assert deadline < notice_deadline

    report = drain(list_tasks(run_dir), exit=True, deadline=deadline, reason="aws terminate notice")

    assert time.time() < notice_deadline  # finished before the deadline despite the hung shim
    by_id = {r.id: r for r in report.results}
    assert set(by_id) == {"job-a", "job-b", "job-bad", "job-hung"}
    assert by_id["job-a"].status == OK and by_id["job-b"].status == OK
    assert by_id["job-a"].seq == 1 and by_id["job-a"].bytes_uploaded == 4096 and by_id["job-a"].key == a.record.key
    assert by_id["job-bad"].status == FAILED
    assert "store unreachable" in by_id["job-bad"].error and "INTERNAL" in by_id["job-bad"].error
    assert by_id["job-hung"].status == TIMED_OUT and "deadline" in by_id["job-hung"].error
    assert not report.ok and report.count(OK) == 2

    # Concurrent: the hung shim was still holding its call when the others had answered.
    assert len(hung.calls) == 1
    for shim in (a, b, bad):
        (call,) = shim.calls
        assert call.request.exit is True and call.request.reason == "aws terminate notice"
        assert call.namespace == shim.record.namespace and call.request.id == shim.record.id
        assert 0 < call.request.timeout_ms <= 5000 and call.time_left is not None
    assert stranger.calls == []  # never touch what is not in the registry
    # The "ok" stand-ins rewrote their records as the shim does; the registry shows the new checkpoint.
    seqs = {r.id: r.last_checkpoint.seq for r in list_tasks(run_dir) if r.last_checkpoint}
    assert seqs == {"job-a": 1, "job-b": 1}


def test_leave_running_checkpoint_sends_exit_false(standins, run_dir) -> None:
    shim = standins.add("job")
    report = drain(list_tasks(run_dir), exit=False, deadline=time.time() + 10, reason="aws rebalance notice")
    assert report.ok
    assert shim.calls[0].request.exit is False


def test_a_dead_shim_fails_clearly_without_holding_up_the_rest(standins, run_dir, tmp_path) -> None:
    standins.add("alive")
    write_task(
        run_dir,
        TaskRecord(namespace="default", id="dead", address=f"unix://{tmp_path}/gone.sock", key="default/pod-dead/main"),
    )
    report = drain(list_tasks(run_dir), exit=True, deadline=time.time() + 10, reason="test")
    by_id = {r.id: r for r in report.results}
    assert by_id["alive"].status == OK
    assert by_id["dead"].status == FAILED and "cannot reach shim" in by_id["dead"].error


def test_a_deadline_already_passed_times_out_without_calling(standins, run_dir) -> None:
    shim = standins.add("job")
    report = drain(list_tasks(run_dir), exit=True, deadline=time.time() - 1, reason="late")
    assert [r.status for r in report.results] == [TIMED_OUT]
    assert shim.calls == []


def test_empty_registry_is_a_successful_no_op(run_dir) -> None:
    report = drain([], exit=True, deadline=time.time() + 5, reason="nothing")
    assert report.ok and report.results == []


def test_margin_is_left_before_the_notice_deadline() -> None:
    now = 1000.0
    assert plan_deadline(now + 120, now) == now + 110  # AWS two minutes: 10 s margin (cap)
    assert plan_deadline(now + 30, now) == now + 24  # GCP/Azure 30 s: 20 %
    assert plan_deadline(now + 5, now) == now + 4  # at least 1 s margin
    assert plan_deadline(now - 5, now) == now + 2  # seen late: still a short try
