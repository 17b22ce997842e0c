"""Fault injection for the crash-safety tests: die, stall or fail at a named point.

- REVENANT_SNAPSHOTTER_CRASH_AT=<name>: the process dies there by SIGKILL, exactly as a node losing
  power or an OOM kill would.
- REVENANT_FAULT_DELAY=<name>=<seconds>[,<name>=<seconds>...]: sleep there (a slow disk or network).
- REVENANT_FAULT_FAIL=<name>[,<name>...]: raise FaultInjected there (a write that keeps failing).

Unset (production) a point costs one dictionary lookup.
"""

from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger(__name__)

ENV = "REVENANT_SNAPSHOTTER_CRASH_AT"
DELAY_ENV = "REVENANT_FAULT_DELAY"
FAIL_ENV = "REVENANT_FAULT_FAIL"


class FaultInjected(OSError):
    """Raised by fail_point: an injected I/O failure."""


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        log.warning("crash point %s reached: SIGKILL", name)
        os.kill(os.getpid(), signal.SIGKILL)


def delay_point(name: str) -> None:
    spec = os.environ.get(DELAY_ENV)
    if not spec:
        return
    for item in spec.split(","):
        point, _, seconds = item.partition("=")
        if point == name:
            time.sleep(float(seconds or 0))


def fail_point(name: str) -> None:
    spec = os.environ.get(FAIL_ENV)
    if spec and name in spec.split(","):
        raise FaultInjected(f"injected failure at {name}")
