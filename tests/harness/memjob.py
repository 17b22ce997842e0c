"""Reading and checking a memjob's progress: the proof that process memory came back intact."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .wait import wait_until

STEP_LINE = re.compile(r"^step=(\d+) checksum=([0-9a-f]{16})$")
LOG_IN_CONTAINER = "/var/log/memjob.log"


@dataclass(frozen=True)
class Step:
    n: int
    checksum: str


def memjob_args(mib: int, seed: int, mutate: float = 0.05, interval_ms: int = 200) -> list[str]:
    return [
        "/bin/memjob",
        "--mib",
        str(mib),
        "--mutate",
        str(mutate),
        "--seed",
        str(seed),
        "--interval-ms",
        str(interval_ms),
        "--log",
        LOG_IN_CONTAINER,
    ]


def read_steps(log: Path) -> list[Step]:
    try:
        text = log.read_text()
    except FileNotFoundError:
        return []
    return [Step(int(m[1]), m[2]) for m in (STEP_LINE.match(line) for line in text.splitlines()) if m]


def wait_for_step(log: Path, at_least: int, timeout: float = 60) -> list[Step]:
    def enough() -> list[Step] | None:
        steps = read_steps(log)
        return steps if steps and steps[-1].n >= at_least else None

    return wait_until(enough, timeout, f"memjob step {at_least} in {log}")


def expected_checksum(memjob_binary: Path, mib: int, seed: int, step: int, mutate: float = 0.05) -> str:
    """Recompute, on the host, the checksum the job's whole memory must have after `step`."""
    out = subprocess.run(
        [str(memjob_binary), "--mib", str(mib), "--mutate", str(mutate), "--seed", str(seed), "--replay", str(step)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout.strip()
    m = STEP_LINE.match(out)
    assert m, f"unexpected memjob --replay output: {out!r}"
    return m[2]


def assert_continuous(steps: list[Step]) -> None:
    """Each step follows the one before: nothing replayed twice, nothing skipped."""
    numbers = [s.n for s in steps]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), f"steps not continuous: {numbers}"
