"""harness.wait.wait_until, the one polling helper every test and benchmark waits with."""

from __future__ import annotations

import pytest

from harness.wait import WaitAborted, WaitTimeout, wait_until


def test_returns_the_first_truthy_value() -> None:
    answers = iter([None, 0, [], {"seq": 3}])
    assert wait_until(lambda: next(answers), 5, "a record", interval=0.001) == {"seq": 3}


def test_times_out_naming_what_it_waited_for_with_detail() -> None:
    calls: list[int] = []
    with pytest.raises(WaitTimeout, match=r"timed out after 0.2s waiting for step 5\nlog tail") as err:
        wait_until(lambda: calls.append(1), 0.2, "step 5", interval=0.01, detail=lambda: "log tail")
    assert isinstance(err.value, AssertionError)  # pytest reports it as a failed check
    assert len(calls) > 2  # it kept trying until the deadline


def test_tries_at_least_once_with_no_time() -> None:
    assert wait_until(lambda: "ready", 0, "readiness") == "ready"


def test_abort_ends_the_wait_at_once() -> None:
    tries: list[int] = []
    alive = iter([None, None, "it exited with 1"])
    with pytest.raises(WaitAborted, match="gave up waiting for the agent: it exited with 1"):
        wait_until(lambda: tries.append(1), 30, "the agent", interval=0.001, abort=lambda: next(alive))
    assert len(tries) == 2  # tried while the process lived, stopped as soon as it was gone


def test_ignored_exceptions_mean_not_yet_and_others_propagate() -> None:
    attempts = iter([ConnectionRefusedError(), ConnectionRefusedError(), "up"])

    def probe() -> str:
        a = next(attempts)
        if isinstance(a, Exception):
            raise a
        return a

    assert wait_until(probe, 5, "the server", interval=0.001, ignore=(ConnectionError,)) == "up"
    with pytest.raises(KeyError):
        wait_until(lambda: {}["missing"], 5, "a key", ignore=(ConnectionError,))
