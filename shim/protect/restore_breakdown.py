"""Where a protected restore's milliseconds go, from Create's fetch to the restored task running.

Create prepares the restore (shim.protect.restorer), Start runs `runc restore` (the checkpoint engine).
The parts, in order:

    prepare_open_ms       opening the store (the backend's client; its first use in a shim imports it)
    prepare_claim_ms      taking the key's owner epoch in the store
    prepare_list_ms       listing the key's checkpoints (manifests)
    prepare_image_ms      waiting, after the fetch, for containerd's answer about the container's image
                          (asked in a child process at Create; the fetch does not wait for it)
    prepare_fetch_ms      Store.get of the checkpoint used: every chunk fetched, verified and written into
                          the directory CRIU reads (`fetch` has its split, shim.store.get_timing)
    prepare_skipped_ms    fetching checkpoints that turned out unusable (damaged, wrong layer) first
    prepare_layer_ms      applying the writable layer to the upper dir
    prepare_other_ms      the rest of the prepare (image checks, scratch, Python)
    runc_own_ms           `runc restore` less CRIU's restore_time: runc and CRIU starting, runc's state,
                          cgroups and the container's setup
    criu_forking_ms       CRIU forking the restored task tree (stats-restore forking_time)
    criu_restore_other_ms the rest of CRIU's restore_time: reading the images (pages into memory), fds,
                          mounts, namespaces
    hooks_ms              what the engine spent after runc (the GPU restore hook) and its bookkeeping

`total_ms` is the sum. The span between Create and Start (containerd's own work) is not in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PARTS = (
    "prepare_open_ms",
    "prepare_claim_ms",
    "prepare_list_ms",
    "prepare_image_ms",
    "prepare_fetch_ms",
    "prepare_skipped_ms",
    "prepare_layer_ms",
    "prepare_other_ms",
    "runc_own_ms",
    "criu_forking_ms",
    "criu_restore_other_ms",
    "hooks_ms",
)


def _ms(seconds: float) -> float:
    return round(max(0.0, seconds) * 1000, 1)


@dataclass
class PrepareTimings:
    """What Restorer.prepare measured (seconds), for the plan it returned."""

    open_s: float = 0.0
    claim_s: float = 0.0
    list_s: float = 0.0
    image_s: float = 0.0
    fetch_s: float = 0.0
    skipped_s: float = 0.0
    layer_s: float = 0.0
    total_s: float = 0.0
    fetch: dict[str, Any] = field(default_factory=dict)  # GetTimings.as_dict() of the fetch used

    def parts(self) -> dict[str, float]:
        known = self.open_s + self.claim_s + self.list_s + self.image_s + self.fetch_s + self.skipped_s + self.layer_s
        return {
            "prepare_open_ms": _ms(self.open_s),
            "prepare_claim_ms": _ms(self.claim_s),
            "prepare_list_ms": _ms(self.list_s),
            "prepare_image_ms": _ms(self.image_s),
            "prepare_fetch_ms": _ms(self.fetch_s),
            "prepare_skipped_ms": _ms(self.skipped_s),
            "prepare_layer_ms": _ms(self.layer_s),
            "prepare_other_ms": _ms(self.total_s - known),
        }


def restore_breakdown(prepare: PrepareTimings | None, restore: Any | None) -> dict[str, Any]:
    """The parts (see the module docstring) plus `total_ms` and the fetch's split under `fetch`.

    `restore` is the engine's RestoreResult (duration_s, runc_s, CRIU's stats) or None when the engine
    did not report one; its parts are then 0. CRIU's times are fitted inside runc's wall time."""
    out: dict[str, Any] = dict.fromkeys(PARTS, 0.0)
    if prepare is not None:
        out.update(prepare.parts())
    if restore is not None:
        runc_s = getattr(restore, "runc_s", None)
        runc_s = restore.duration_s if runc_s is None else runc_s
        stats = restore.stats
        criu_s = min(stats.restore_time_us / 1e6, runc_s) if stats else 0.0
        forking_s = min(stats.forking_time_us / 1e6, criu_s) if stats else 0.0
        out["runc_own_ms"] = _ms(runc_s - criu_s)
        out["criu_forking_ms"] = _ms(forking_s)
        out["criu_restore_other_ms"] = _ms(criu_s - forking_s)
        out["hooks_ms"] = _ms(restore.duration_s - runc_s)
        if stats:
            out["pages_restored"] = stats.pages_restored
    out["total_ms"] = round(sum(out[p] for p in PARTS), 1)
    if prepare is not None and prepare.fetch:
        out["fetch"] = prepare.fetch
    return out


def describe(breakdown: dict[str, Any]) -> str:
    """One log line: the non-zero parts, then the fetch's split."""
    parts = ", ".join(f"{p[:-3]} {breakdown[p]:.0f}" for p in PARTS if breakdown.get(p))
    text = f"{breakdown.get('total_ms', 0):.0f} ms: {parts}"
    fetch = breakdown.get("fetch")
    if fetch:
        text += (
            f"; fetch of {fetch['bytes_written'] >> 20} MiB in {fetch['files']} files, {fetch['chunks']} chunks "
            f"({fetch['zero_chunks']} holes), thread ms: get {fetch['fetch_ms']:.0f}, open {fetch['open_ms']:.0f}, "
            f"decode {fetch['decode_ms']:.0f}, verify {fetch['verify_ms']:.0f}, write {fetch['write_ms']:.0f} "
            f"(overlap {fetch['overlap']}x)"
        )
    return text
