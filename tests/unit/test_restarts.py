"""Restart inside a pod: fresh by default, restore when asked, and the crash-loop guard's fallback."""

from __future__ import annotations

import pytest

from shim.protect.policy import PolicyError
from shim.protect.restarts import Attempt, KeyHistory, RestartPolicy, decide

ON = RestartPolicy(restore=True, window_s=60)


def run(history: KeyHistory, restored_from: int | None, ran_s: float, committed=(), status=137) -> None:
    attempt = Attempt(started_at=1000.0, restored_from=restored_from, committed=list(committed))
    attempt.exited_at, attempt.exit_status = 1000.0 + ran_s, status
    history.last = attempt
    history.ended(attempt, ON.window_s)


def test_policy_defaults_to_fresh_and_reads_annotations():
    assert RestartPolicy.from_annotations({}) == RestartPolicy(False, 60)
    policy = RestartPolicy.from_annotations(
        {"revenant.io/restore-on-restart": "true", "revenant.io/crash-loop-window": "90s"}
    )
    assert policy == RestartPolicy(True, 90)


@pytest.mark.parametrize(
    ("annotations", "reason"),
    [
        ({"revenant.io/restore-on-restart": "maybe"}, r"restore-on-restart: 'maybe' is not true or false"),
        ({"revenant.io/crash-loop-window": "soon"}, r"crash-loop-window: 'soon' is not a duration"),
        ({"revenant.io/crash-loop-window": "off"}, r"crash-loop-window: 'off' is outside"),
        ({"revenant.io/crash-loop-window": "48h"}, r"crash-loop-window: '48h' is outside"),
    ],
)
def test_bad_restart_annotations_name_themselves(annotations, reason):
    with pytest.raises(PolicyError, match=reason):
        RestartPolicy.from_annotations(annotations)


def test_restart_without_the_policy_starts_fresh_and_says_why():
    history = KeyHistory()
    run(history, None, 500, committed=[1, 2])
    d = decide(history, RestartPolicy())
    assert not d.restore
    assert "exit status 137" in d.reason and "restore-on-restart is off" in d.reason


def test_restart_with_the_policy_restores_the_newest():
    history = KeyHistory()
    run(history, None, 500, committed=[1, 2, 3])
    d = decide(history, ON)
    assert d.restore and d.skip_seqs == frozenset()


def test_quick_death_after_restore_falls_back_then_starts_fresh():
    history = KeyHistory()
    run(history, None, 500, committed=[1, 2, 3])
    run(history, 3, 5, committed=[4])  # restored from 3, checkpointed 4, died after 5s
    d = decide(history, ON)
    assert d.restore and d.skip_seqs == {3, 4}, "neither the restored checkpoint nor its child is used again"
    assert "crash-loop guard" in d.reason and "seq 3" in d.reason and "the checkpoint before it" in d.reason
    run(history, 2, 5)
    d = decide(history, ON)
    assert not d.restore and "crash-loop guard" in d.reason and "seq 2" in d.reason and "starting fresh" in d.reason
    run(history, None, 5)  # a fresh start that dies quickly is not the checkpoint's fault, but stays fresh
    assert not decide(history, ON).restore


def test_an_attempt_that_outlives_the_window_resets_the_guard():
    history = KeyHistory()
    run(history, 3, 5)
    run(history, None, 500, committed=[7, 8])
    d = decide(history, ON)
    assert d.restore and d.skip_seqs == {3} and "crash-loop guard" not in d.reason
