"""The one polling helper of the tests, the harness and the benchmarks: wait until a condition holds.

Standard library only: tests/gpu/gpu_check.py imports it on a GPU machine that has no test dependencies.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The condition did not hold in time (an AssertionError, so pytest reports it as a failed check)."""


class WaitAborted(AssertionError):
    """What the wait was for can no longer happen (the process that would make it true has exited)."""


def wait_until(
    cond: Callable[[], T],
    timeout: float,
    what: str,
    *,
    interval: float = 0.1,
    ignore: tuple[type[BaseException], ...] = (),
    abort: Callable[[], str | None] | None = None,
    detail: Callable[[], str] | None = None,
) -> T:
    """Call `cond` every `interval` s until it returns something truthy, and return that value.

    - `what` names the awaited thing in the error ("memjob step 5 in LOG").
    - `ignore`: exceptions from `cond` that mean "not yet" (a server still starting refuses connections).
    - `abort`: called before each try; a returned reason (e.g. "containerd exited with 1") ends the wait
      at once with WaitAborted instead of sleeping out the timeout.
    - `detail`: called only on failure, its text appended to the error (a log tail).
    `cond` is always tried at least once, even with timeout 0.
    """
    deadline = time.monotonic() + timeout
    while True:
        reason = abort() if abort is not None else None
        if reason:
            raise WaitAborted(_message(f"gave up waiting for {what}: {reason}", detail))
        try:
            value = cond()
            if value:
                return value
        except ignore:
            pass  # not yet
        if time.monotonic() >= deadline:
            raise WaitTimeout(_message(f"timed out after {timeout}s waiting for {what}", detail))
        time.sleep(interval)


def _message(head: str, detail: Callable[[], str] | None) -> str:
    return f"{head}\n{detail()}" if detail is not None else head
