"""Where a protected checkpoint's frozen milliseconds go.

The frozen window is the span the checkpointer measures from just before it freezes the job to just
after it let it run again. It splits into parts that add up to it exactly (`unaccounted_ms` takes
what no part measured: Python between the steps):

    pause_ms              freezing the container's cgroup before the dump (0 when CRIU freezes it)
    hooks_ms              dump hooks around runc (the CUDA checkpoint of a GPU job)
    runc_own_ms           `runc checkpoint` minus CRIU's own time: runc and CRIU starting, runc's
                          state, version probe and descriptors, CRIU's setup before it freezes
    criu_freezing_ms      CRIU freezing the tasks (stats-dump freezing_time)
    criu_memdrain_ms      CRIU scanning the pagemap and its parasite vmsplicing the pages into pipes
                          (stats-dump memdump_time less memwrite_time: CRIU's memdump_time contains
                          the writes, criu/mem.c times xfer_pages inside it)
    criu_memwrite_ms      CRIU writing those pages into the image files (memwrite_time)
    criu_frozen_other_ms  the rest of CRIU's frozen_time: parasite, fds, mounts, namespaces, other images
    engine_other_ms       the engine's bookkeeping around runc (directories, stats, image size)
    layer_ms              capturing the writable layer
    resume_ms             thawing the container's cgroup
    unaccounted_ms        the remainder

A part CRIU did not report (no stats-dump) is 0 and its time stays in `runc_own_ms`.
"""

from __future__ import annotations

from typing import Any

PARTS = (
    "pause_ms",
    "hooks_ms",
    "runc_own_ms",
    "criu_freezing_ms",
    "criu_memdrain_ms",
    "criu_memwrite_ms",
    "criu_frozen_other_ms",
    "engine_other_ms",
    "layer_ms",
    "resume_ms",
    "unaccounted_ms",
)


def _ms(seconds: float) -> float:
    return round(max(0.0, seconds) * 1000, 3)


def freeze_breakdown(
    *,
    total_s: float,
    pause_s: float,
    dump: Any,
    layer_s: float,
    resume_s: float,
) -> dict[str, float]:
    """The frozen window's parts in milliseconds (see the module docstring) plus `total_ms`.

    `dump` is the engine's CheckpointResult: its `timings` (hooks_before_s, runc_checkpoint_s,
    hooks_after_s), `duration_s` and CRIU's `stats`. Each part is clamped at 0, and CRIU's parts are
    fitted inside runc's wall time, so the parts never add up to more than the total."""
    timings = dump.timings
    hooks_s = timings.get("hooks_before_s", 0.0) + timings.get("hooks_after_s", 0.0)
    runc_s = timings.get("runc_checkpoint_s", 0.0)
    stats = dump.stats
    freezing_s = frozen_s = memdump_s = memwrite_s = 0.0
    if stats is not None:
        # CRIU's clock runs inside runc's lifetime; a part that claims more than runc took is cut.
        freezing_s = min(stats.freezing_time_us / 1e6, runc_s)
        frozen_s = min(stats.frozen_time_us / 1e6, runc_s - freezing_s)
        memdump_s = min(stats.memdump_time_us / 1e6, frozen_s)  # drain and write
        memwrite_s = min(stats.memwrite_time_us / 1e6, memdump_s)
    parts = {
        "pause_ms": _ms(pause_s),
        "hooks_ms": _ms(hooks_s),
        "runc_own_ms": _ms(runc_s - freezing_s - frozen_s),
        "criu_freezing_ms": _ms(freezing_s),
        "criu_memdrain_ms": _ms(memdump_s - memwrite_s),
        "criu_memwrite_ms": _ms(memwrite_s),
        "criu_frozen_other_ms": _ms(frozen_s - memdump_s),
        "engine_other_ms": _ms(dump.duration_s - hooks_s - runc_s),
        "layer_ms": _ms(layer_s),
        "resume_ms": _ms(resume_s),
    }
    total_ms = _ms(total_s)
    parts["unaccounted_ms"] = round(max(0.0, total_ms - sum(parts.values())), 3)
    return {"total_ms": total_ms, **parts}


def format_breakdown(breakdown: dict[str, float]) -> str:
    """`key=value` pairs (logfmt) for a structured log line."""
    return " ".join(f"{k}={v:.1f}" for k, v in breakdown.items())
