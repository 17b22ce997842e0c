"""The data-path sweep's results: JSON in, Markdown tables and PNG plots out (no root, no containerd).

bench/sweep_bench.py measures and writes the JSON; this module draws it, so a recorded run's plots can be
redrawn without rerunning it (`bench/sweep_bench.py --plot-only FILE...`). The JSON (one object):

    sizes          [{"gib", "revenant": {...}, "runc": {...}, "podman": {...}}]  freeze / commit / restore
    incremental    {"gib", "steps_between", "checkpoints": [{"seq", "bytes_read", "bytes_uploaded"}]}
    interruptions  {"mib", "steps", "runs": [{"k", "wall_s", "moves_s", "lost"}]}
    meta           {"command", "started", "finished", "load": [...], ...}

Every figure is seconds (or bytes); a missing one (a side skipped or failed) is null and not drawn.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PNG_SIZES = "sweep_sizes.png"
PNG_INCREMENTAL = "sweep_incremental.png"
PNG_INTERRUPTIONS = "sweep_interruptions.png"
SECTIONS = ("sizes", "incremental", "interruptions")
SIDE_COLORS = {"revenant": "tab:blue", "runc": "tab:orange", "podman": "tab:green"}

# (panel title, [(series label, side, field)]) for the size plot; side is a key of one size's entry.
SIZE_PANELS: tuple[tuple[str, tuple[tuple[str, str, str], ...]], ...] = (
    (
        "freeze (job stopped)",
        (
            ("revenant, frozen window", "revenant", "freeze_s"),
            ("runc --leave-running, CRIU frozen", "runc", "frozen_s"),
            ("podman export --leave-running (wall)", "podman", "export_s"),
        ),
    ),
    (
        "first checkpoint committed",
        (
            ("revenant -> local store", "revenant", "commit_local_s"),
            ("revenant notice -> S3 (agent)", "revenant", "notice_s3_s"),
            ("runc --leave-running to disk (wall)", "runc", "checkpoint_s"),
            ("podman --export zstd (wall)", "podman", "export_s"),
        ),
    ),
    (
        "restore to running",
        (
            ("revenant `ctr run` on node B", "revenant", "restore_s"),
            ("runc: zstd -d | tar -x + restore", "runc", "restore_s"),
            ("podman restore --import", "podman", "import_s"),
        ),
    ),
)


def load(paths: Sequence[Path]) -> dict[str, Any]:
    """Read one or more result files (runs split into parts): sizes are merged by size and side, a later
    file's figures replacing an earlier one's for the same size; the other sections are replaced whole."""
    merged: dict[str, Any] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a sweep result (a JSON object expected)")
        validate(data)
        for key, value in data.items():
            if key == "meta":  # one per part (a merged file's list, kept flat)
                merged.setdefault("meta", []).extend(value if isinstance(value, list) else [value])
            elif key == "sizes":
                by_gib = {e["gib"]: e for e in merged.get("sizes", [])}
                for e in value or []:
                    old = by_gib.get(e["gib"], {})
                    sides = {k: {**(old.get(k) or {}), **v} for k, v in e.items() if isinstance(v, dict)}
                    by_gib[e["gib"]] = {**old, **e, **sides}
                merged["sizes"] = [by_gib[g] for g in sorted(by_gib)]
            elif key in SECTIONS:
                merged[key] = value
    return merged


def validate(data: dict[str, Any]) -> None:
    """Check the shape the plots and tables rely on: a clear error instead of a traceback in matplotlib."""
    for entry in data.get("sizes") or []:
        if not isinstance(entry, dict) or not _finite(entry.get("gib")) or entry["gib"] <= 0:
            raise ValueError(f"sizes: each entry needs a positive 'gib', got {entry!r:.200}")
        for side in ("revenant", "runc", "podman"):
            if not isinstance(entry.get(side, {}), dict):
                raise ValueError(f"sizes[{entry['gib']}].{side}: an object expected")
    inc = data.get("incremental")
    if inc is not None:
        cps = inc.get("checkpoints") if isinstance(inc, dict) else None
        if not isinstance(cps, list) or not all(isinstance(c, dict) and _finite(c.get("bytes_uploaded")) for c in cps):
            raise ValueError("incremental.checkpoints: a list of objects with bytes_uploaded expected")
    runs = data.get("interruptions")
    if runs is not None:
        items = runs.get("runs") if isinstance(runs, dict) else None
        if not isinstance(items, list) or not all(
            isinstance(r, dict) and isinstance(r.get("k"), int) and _finite(r.get("wall_s")) for r in items
        ):
            raise ValueError("interruptions.runs: a list of objects with integer k and wall_s expected")


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def value(entry: dict[str, Any], side: str, field: str) -> float | None:
    v = (entry.get(side) or {}).get(field)
    return float(v) if _finite(v) else None


def linear_fit(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares (slope, intercept) through (x, y); None with fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return slope, my - slope * mx


def overheads(data: dict[str, Any]) -> list[dict[str, float]]:
    """Per interruption count: wall, overhead % against the k=0 run, seconds per move, steps lost."""
    runs = sorted((data.get("interruptions") or {}).get("runs") or [], key=lambda r: r["k"])
    plain = next((r["wall_s"] for r in runs if r["k"] == 0), None)
    out = []
    for r in runs:
        pct = 100 * (r["wall_s"] - plain) / plain if plain else math.nan
        per_move = r.get("moves_s", math.nan) / r["k"] if r["k"] else math.nan
        out.append({"k": r["k"], "wall_s": r["wall_s"], "overhead_pct": pct, "per_move_s": per_move, **r})
    return out


def _s(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.2f}"


def _load(entry: dict[str, Any]) -> str:
    before, after = entry.get("load_before"), entry.get("load_after")
    return f"{before:.0f} / {after:.0f}" if _finite(before) and _finite(after) else "-"


def size_table(data: dict[str, Any]) -> str:
    rows = [
        "| GiB | revenant frozen | runc frozen (wall) | podman export | revenant commit local | "
        "revenant notice -> S3 | revenant restore | runc restore | podman import | load before / after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in sorted(data.get("sizes") or [], key=lambda e: e["gib"]):
        runc_ck = value(e, "runc", "checkpoint_s")
        rows.append(
            f"| {e['gib']:g}{' (one job at a time)' if e.get('one_job_at_a_time') else ''}"
            f" | {_s(value(e, 'revenant', 'freeze_s'))} | {_s(value(e, 'runc', 'frozen_s'))}"
            f" ({_s(runc_ck)}) | {_s(value(e, 'podman', 'export_s'))} | {_s(value(e, 'revenant', 'commit_local_s'))}"
            f" | {_s(value(e, 'revenant', 'notice_s3_s'))} | {_s(value(e, 'revenant', 'restore_s'))}"
            f" | {_s(value(e, 'runc', 'restore_s'))} | {_s(value(e, 'podman', 'import_s'))} | {_load(e)} |"
        )
    return "\n".join(rows)


def extrapolation_table(data: dict[str, Any], at_gib: float, min_gib: float = 1.0) -> str:
    """Each series' least-squares line through the measured sizes >= min_gib, evaluated at `at_gib`:
    an extrapolation, labelled as one wherever it is printed."""
    rows = [
        f"| series (EXTRAPOLATED to {at_gib:g} GiB from sizes >= {min_gib:g} GiB) | fitted s per GiB | "
        f"at {at_gib:g} GiB, fitted line | at {at_gib:g} GiB, largest size scaled | measured at |",
        "|---|---|---|---|---|",
    ]
    seen: set[tuple[str, str]] = set()
    for _, series in SIZE_PANELS:
        for label, side, field in series:
            if (side, field) in seen:  # a figure drawn in two panels (podman's export) is one row
                continue
            seen.add((side, field))
            pts = [
                (e["gib"], v)
                for e in data.get("sizes") or []
                if e["gib"] >= min_gib and (v := value(e, side, field)) is not None
            ]
            fit = linear_fit(pts)
            if fit is None:
                continue
            slope, icpt = fit
            # A slope <= 0 says the sizes met different machine load, not that bigger is faster.
            fitted = f"{slope * at_gib + icpt:.1f} s" if slope > 0 else "no usable slope"
            big_x, big_y = max(pts)
            cell = label.replace("|", "\\|")  # a pipe inside a Markdown cell
            rows.append(
                f"| {cell} ({field}) | {slope:.2f} | {fitted} | {big_y * at_gib / big_x:.1f} s | "
                f"{', '.join(f'{x:g}' for x, _ in sorted(pts))} GiB |"
            )
    return "\n".join(rows)


def notice_breakdown_table(data: dict[str, Any]) -> str:
    """Where notice -> committed in S3 goes, per size: the agent's reaction (notice to the shim's answer,
    minus the shim's own total), the frozen window (CRIU's drain and write), and the store put after it
    (chunk + hash + compress + upload, pipelined); beside it the same job size's put into the local store
    (the same chunk/hash/compress work, a local write instead of the upload)."""
    rows = [
        "| GiB | notice -> committed | agent + RPC | frozen (CRIU drain / write) | put to S3 after the freeze | "
        "local put, same size | S3 minus local put |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in sorted(data.get("sizes") or [], key=lambda e: e["gib"]):
        total, shim, frz = (value(e, "revenant", f) for f in ("notice_s3_s", "s3_shim_total_s", "s3_freeze_s"))
        if total is None or shim is None or frz is None:
            continue
        parts = (e.get("revenant") or {}).get("s3_freeze_parts") or {}
        drain, write = parts.get("criu_memdrain_ms"), parts.get("criu_memwrite_ms")
        crius = f" ({drain / 1000:.2f} / {write / 1000:.2f})" if _finite(drain) and _finite(write) else ""
        local_ck, local_frz = value(e, "revenant", "commit_local_s"), value(e, "revenant", "freeze_s")
        local_put = local_ck - local_frz if local_ck is not None and local_frz is not None else None
        put = shim - frz
        rows.append(
            f"| {e['gib']:g} | {total:.2f} | {total - shim:.2f} | {frz:.2f}{crius} | {put:.2f} | {_s(local_put)} | "
            f"{_s(put - local_put if local_put is not None else None)} |"
        )
    return "\n".join(rows)


def incremental_table(data: dict[str, Any]) -> str:
    inc = data.get("incremental") or {}
    rows = [
        "| checkpoint | memjob steps since the previous | bytes read (MiB) | uploaded (MiB) | uploaded / read |",
        "|---|---|---|---|---|",
    ]
    prev = None
    for c in inc.get("checkpoints") or []:
        read = c.get("bytes_read") or 0
        up = c["bytes_uploaded"]
        step = c.get("step")
        since = "-" if prev is None or step is None else str(step - prev)
        prev = step
        share = f"{100 * up / read:.1f} %" if read else "-"
        rows.append(f"| {c.get('seq', '?')} | {since} | {read / 2**20:.1f} | {up / 2**20:.1f} | {share} |")
    return "\n".join(rows) if inc else ""


def interruptions_table(data: dict[str, Any]) -> str:
    rows = [
        "| interruptions | wall s | overhead | s per move | steps lost |",
        "|---|---|---|---|---|",
    ]
    for r in overheads(data):
        rows.append(
            f"| {r['k']} | {r['wall_s']:.1f} | {r['overhead_pct']:.2f} % | {_s(r['per_move_s'])} | "
            f"{r.get('lost', '-')} |"
        )
    return "\n".join(rows)


def tables(data: dict[str, Any], extrapolate_gib: float = 16.0) -> str:
    parts = []
    if data.get("sizes"):
        parts += [size_table(data), notice_breakdown_table(data), extrapolation_table(data, extrapolate_gib)]
    if data.get("incremental"):
        parts.append(incremental_table(data))
    if data.get("interruptions"):
        parts.append(interruptions_table(data))
    return "\n\n".join(parts)


def plot(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """Draw every section present into out_dir; returns the files written ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    sizes = sorted(data.get("sizes") or [], key=lambda e: e["gib"])
    if sizes:
        fig, axes = plt.subplots(1, len(SIZE_PANELS), figsize=(14, 4.3))
        for ax, (title, series) in zip(axes, SIZE_PANELS, strict=True):
            for label, side, field in series:
                pts = [(e["gib"], v) for e in sizes if (v := value(e, side, field)) is not None]
                if pts:
                    style = "--" if "S3" in label else "-"
                    xs, ys = [x for x, _ in pts], [y for _, y in pts]
                    ax.plot(xs, ys, style, marker="o", color=SIDE_COLORS[side], label=label)
            ax.set(xlabel="job memory (GiB)", ylabel="seconds", title=title)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        written.append(_save(fig, plt, out_dir / PNG_SIZES))
    inc = data.get("incremental")
    if inc and inc.get("checkpoints"):
        cps = inc["checkpoints"]
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = list(range(1, len(cps) + 1))
        ax.bar(xs, [c["bytes_uploaded"] / 2**20 for c in cps], label="uploaded")
        ax.plot(xs, [(c.get("bytes_read") or 0) / 2**20 for c in cps], "k--", marker=".", label="checkpoint size")
        pairs = itertools.pairwise(cps)
        steps = [b["step"] - a["step"] for a, b in pairs if _finite(a.get("step")) and _finite(b.get("step"))]
        between = f"~{statistics.median(steps):g}" if steps else "?"
        mutate = inc.get("mutate")
        share = f"{100 * mutate:g} %" if _finite(mutate) else "?"
        ax.set(
            xlabel="checkpoint of one job",
            ylabel="MiB",
            title=f"uploaded per checkpoint: {inc.get('gib', '?')} GiB memjob,\n"
            f"{between} steps between, each rewriting {share} of its pages at random",
        )
        ax.set_xticks(xs)
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, plt, out_dir / PNG_INCREMENTAL))
    rows = overheads(data)
    if rows:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["k"] for r in rows], [r["overhead_pct"] for r in rows], marker="o", label="measured")
        ax.axhline(2.0, color="grey", linestyle=":", label="target 2 %")
        meta = data.get("interruptions") or {}
        ax.set(
            xlabel="interruptions (final checkpoint + restore on the other node)",
            ylabel="wall-time overhead %",
            title=f"interrupted run: {meta.get('steps', '?')} steps, {meta.get('mib', '?')} MiB memjob",
        )
        ax.set_xticks([r["k"] for r in rows])
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, plt, out_dir / PNG_INTERRUPTIONS))
    return written


def _save(fig: Any, plt: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
