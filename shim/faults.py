"""Fault injection for the crash-safety tests: die by SIGKILL at a named point.

Set REVENANT_SNAPSHOTTER_CRASH_AT=<name> to make the process die there exactly as a node losing
power or an OOM kill would. Unset (production) a crash point costs one dictionary lookup.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

ENV = "REVENANT_SNAPSHOTTER_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        log.warning("crash point %s reached: SIGKILL", name)
        os.kill(os.getpid(), signal.SIGKILL)
