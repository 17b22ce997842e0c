"""What a protected container restarted inside its pod starts from, with a crash-loop guard.

The kubelet restarts a crashed or OOM-killed container in the same pod (a new CreateContainer, attempt
N+1, in the same sandbox, so in the same shim). A crash usually means the state is bad, so by default
the new attempt starts fresh; `revenant.io/restore-on-restart: "true"` restores the last checkpoint.
The guard: a restored attempt that dies within the crash-loop window (default 60s) marks the checkpoint
it restored, and any it committed itself, as bad; the next attempt falls back to the checkpoint before
it, and after a second such death starts fresh. Each decision carries the reason (shim log, the
`/revenant/restore` event, the registry record).

The history lives in the pod's shim: it ends with the pod. A pod re-created elsewhere (a new sandbox)
is not a restart: it restores the newest usable checkpoint as always.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from shim.protect.policy import PolicyError, parse_bool, parse_duration

RESTORE_ON_RESTART = "revenant.io/restore-on-restart"
CRASH_LOOP_WINDOW = "revenant.io/crash-loop-window"
DEFAULT_CRASH_LOOP_WINDOW_S = 60.0
MAX_CRASH_LOOP_WINDOW_S = 86400.0
# Restored attempts that may die quickly in a row before the next one starts fresh: the newest
# checkpoint, then the one before it.
MAX_QUICK_RESTORES = 2


@dataclass(frozen=True)
class RestartPolicy:
    restore: bool = False
    window_s: float = DEFAULT_CRASH_LOOP_WINDOW_S

    @classmethod
    def from_annotations(cls, annotations: Mapping[str, str]) -> RestartPolicy:
        restore = (
            parse_bool(annotations[RESTORE_ON_RESTART], RESTORE_ON_RESTART)
            if RESTORE_ON_RESTART in (annotations)
            else False
        )
        window = DEFAULT_CRASH_LOOP_WINDOW_S
        if CRASH_LOOP_WINDOW in annotations:
            window = parse_duration(annotations[CRASH_LOOP_WINDOW], CRASH_LOOP_WINDOW)
            if not 0 < window <= MAX_CRASH_LOOP_WINDOW_S:
                raise PolicyError(f"{CRASH_LOOP_WINDOW}: {annotations[CRASH_LOOP_WINDOW]!r} is outside 1s .. 24h")
        return cls(restore, window)


@dataclass
class Attempt:
    """One run of a protected container in this pod."""

    started_at: float  # wall clock
    restored_from: int | None  # checkpoint seq it was restored from; None: started fresh
    committed: list[int] = field(default_factory=list)  # checkpoints it committed
    exited_at: float | None = None
    exit_status: int | None = None

    @property
    def ran_s(self) -> float:
        return (self.exited_at or self.started_at) - self.started_at


@dataclass
class KeyHistory:
    """The attempts of one checkpoint key in this pod, as far as the guard needs them."""

    last: Attempt | None = None
    bad_seqs: set[int] = field(default_factory=set)
    quick_restores: list[str] = field(default_factory=list)  # consecutive quick deaths after a restore

    def ended(self, attempt: Attempt, window_s: float) -> None:
        """Count an attempt that exited: a restore that died within the window condemns its checkpoint."""
        if attempt.restored_from is not None and attempt.ran_s < window_s:
            self.bad_seqs.add(attempt.restored_from)
            self.bad_seqs.update(attempt.committed)
            self.quick_restores.append(
                f"the restore from seq {attempt.restored_from} exited (status {attempt.exit_status}) after "
                f"{attempt.ran_s:.1f}s, within the crash-loop window of {window_s:g}s"
            )
        elif attempt.ran_s >= window_s:
            self.quick_restores.clear()


@dataclass(frozen=True)
class RestartDecision:
    restore: bool
    skip_seqs: frozenset[int]
    reason: str


def decide(history: KeyHistory, policy: RestartPolicy) -> RestartDecision:
    """What the next attempt of a container restarted in its pod starts from, and why."""
    last = history.last
    status = last.exit_status if last is not None else None
    restarted = f"restarted in its pod after exit status {status}"
    if not policy.restore:
        return RestartDecision(
            False, frozenset(), f"{restarted}; {RESTORE_ON_RESTART} is off (a crash may mean bad state): starting fresh"
        )
    if len(history.quick_restores) >= MAX_QUICK_RESTORES:
        why = "; ".join(history.quick_restores[-MAX_QUICK_RESTORES:])
        return RestartDecision(
            False, frozenset(history.bad_seqs), f"{restarted}; crash-loop guard: {why}: starting fresh"
        )
    if history.quick_restores:
        why = history.quick_restores[-1]
        return RestartDecision(
            True,
            frozenset(history.bad_seqs),
            f"{restarted}; crash-loop guard: {why}: falling back to the checkpoint before it",
        )
    return RestartDecision(True, frozenset(history.bad_seqs), f"{restarted}; {RESTORE_ON_RESTART}: restoring")
