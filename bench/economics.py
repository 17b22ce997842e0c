"""Spot economics: what a long job costs on spot with revenant, on on-demand, and on spot restarting from scratch.

A model, not a measurement: it turns the measured per-checkpoint and per-move costs (bench/RESULTS.md)
into expected wall time and cost per job. Command:

    .venv/bin/python bench/economics.py                  # defaults below, table + bench/economics.png
    .venv/bin/python bench/economics.py --job-h 72 --interval-s 600 --notice-share 1

Model (times in seconds, rate lambda per second of wall time):
- spot + revenant: the job's work W is paused for `freeze_s` at every checkpoint (W / interval of them;
  the upload runs in the background). An interruption costs L = share * (notice_to_commit + restore)
  + (1 - share) * (interval / 2 + restore): with a notice long enough for the final checkpoint nothing
  is lost but the move; without one, the work since the last checkpoint (half an interval on average)
  is redone. Interruptions arrive at lambda per wall second, so T = W (1 + freeze / interval) + lambda T L,
  i.e. T = W (1 + freeze / interval) / (1 - lambda L); no finite T when lambda L >= 1.
- spot without checkpoints: every interruption restarts the job from scratch after `restart_s`; for
  exponential interruptions the expected wall time is (1 / lambda + restart) (exp(lambda W) - 1).
  Beyond `never_factor` times the job's length it is reported as "never".
- on-demand: never interrupted, T = W.
Cost = T * price per hour. Not modelled: the store's storage and traffic, the time to find a new
node (the reschedule gap), the commit lag of a background checkpoint (work since the last *committed*
checkpoint is what is lost), interruptions during a move.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent
PNG_NAME = "economics.png"

# Defaults from bench/RESULTS.md, section "Protection" (128 MiB memjob, 2-core dev VM):
#   freeze_s          "freeze, leave-running checkpoint (128 MiB) | 0.50 s frozen"
#   restore_s         "restore on B, to running (128 MiB) | 1.50 s (`ctr run`, Create to running, from seq 2)"
#   notice_to_commit  "A final checkpoint held frozen until it is committed": notice -> committed, S3,
#                     median 22.0 s (this is the slow SeaweedFS-on-a-loaded-VM figure, so pessimistic)
#   restart_s         section "Shim": `ctr run` with revenant's default fresh shim, median 312 ms
# Prices are illustrative (spot at ~35 % of on-demand); pass the real ones with --spot-price/--od-price.
DEFAULT_FREEZE_S = 0.50
DEFAULT_RESTORE_S = 1.50
DEFAULT_NOTICE_TO_COMMIT_S = 22.0
DEFAULT_RESTART_S = 0.312
DEFAULT_SPOT_PRICE = 0.35
DEFAULT_OD_PRICE = 1.00
DEFAULT_JOB_H = 24.0
DEFAULT_INTERVAL_S = 300.0
DEFAULT_RATES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
DEFAULT_NEVER_FACTOR = 100.0
PLOT_INTERVALS_S = (60.0, 300.0, 900.0, 3600.0)


@dataclass(frozen=True)
class Inputs:
    job_h: float = DEFAULT_JOB_H
    interval_s: float = DEFAULT_INTERVAL_S
    rate_per_h: float = 0.0
    freeze_s: float = DEFAULT_FREEZE_S
    notice_to_commit_s: float = DEFAULT_NOTICE_TO_COMMIT_S
    restore_s: float = DEFAULT_RESTORE_S
    restart_s: float = DEFAULT_RESTART_S
    notice_share: float = 0.0  # interruptions whose notice is long enough for the final checkpoint
    spot_price: float = DEFAULT_SPOT_PRICE
    od_price: float = DEFAULT_OD_PRICE
    never_factor: float = DEFAULT_NEVER_FACTOR

    def __post_init__(self) -> None:
        positive = {"job_h": self.job_h, "interval_s": self.interval_s, "never_factor": self.never_factor}
        for name, value in positive.items():
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        non_negative = {
            "rate_per_h": self.rate_per_h,
            "freeze_s": self.freeze_s,
            "notice_to_commit_s": self.notice_to_commit_s,
            "restore_s": self.restore_s,
            "restart_s": self.restart_s,
            "spot_price": self.spot_price,
            "od_price": self.od_price,
        }
        for name, value in non_negative.items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not 0.0 <= self.notice_share <= 1.0:
            raise ValueError(f"notice_share must be between 0 and 1, got {self.notice_share}")
        if self.never_factor < 1:
            raise ValueError(f"never_factor must be at least 1, got {self.never_factor}")


@dataclass(frozen=True)
class Outcome:
    """Expected wall time (s) and cost of one job; wall_s is None for "never finishes"."""

    wall_s: float | None
    cost: float | None
    overhead_pct: float | None  # (wall - work) / work * 100


def loss_per_interruption_s(inp: Inputs) -> float:
    """Expected wall seconds one interruption costs a revenant-protected job."""
    announced = inp.notice_to_commit_s + inp.restore_s
    unannounced = inp.interval_s / 2 + inp.restore_s
    return inp.notice_share * announced + (1 - inp.notice_share) * unannounced


def _outcome(inp: Inputs, wall_s: float | None, price: float) -> Outcome:
    work_s = inp.job_h * 3600
    if wall_s is None or wall_s > inp.never_factor * work_s:
        return Outcome(None, None, None)
    return Outcome(wall_s, wall_s / 3600 * price, (wall_s - work_s) / work_s * 100)


def on_demand(inp: Inputs) -> Outcome:
    return _outcome(inp, inp.job_h * 3600, inp.od_price)


def spot_revenant(inp: Inputs) -> Outcome:
    work_s = inp.job_h * 3600
    running_s = work_s * (1 + inp.freeze_s / inp.interval_s)
    lost_share = inp.rate_per_h / 3600 * loss_per_interruption_s(inp)
    if lost_share >= 1:
        return _outcome(inp, None, inp.spot_price)
    return _outcome(inp, running_s / (1 - lost_share), inp.spot_price)


def restart_from_scratch_s(job_s: float, rate_per_s: float, restart_s: float) -> float:
    """Expected wall time to finish `job_s` of work when each interruption restarts it from zero."""
    if rate_per_s == 0:
        return job_s
    exponent = rate_per_s * job_s
    if exponent > 700:  # exp() would overflow a float: far beyond any cap
        return math.inf
    return (1 / rate_per_s + restart_s) * math.expm1(exponent)


def spot_scratch(inp: Inputs) -> Outcome:
    wall_s = restart_from_scratch_s(inp.job_h * 3600, inp.rate_per_h / 3600, inp.restart_s)
    return _outcome(inp, None if math.isinf(wall_s) else wall_s, inp.spot_price)


def _hours(out: Outcome) -> str:
    return "never" if out.wall_s is None else f"{out.wall_s / 3600:.2f}"


def _money(out: Outcome) -> str:
    return "never" if out.cost is None else f"{out.cost:.2f}"


def _pct(out: Outcome) -> str:
    return "never" if out.overhead_pct is None else f"{out.overhead_pct:.2f}"


def table(base: Inputs, rates: Sequence[float]) -> str:
    """A markdown table, one row per interruption rate."""
    lines = [
        "| interruptions / h | on-demand h | on-demand cost | spot+revenant h | overhead % | spot+revenant cost "
        "| spot, no checkpoints h | spot, no checkpoints cost |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rate in rates:
        inp = _with(base, rate_per_h=rate)
        od, rv, sc = on_demand(inp), spot_revenant(inp), spot_scratch(inp)
        lines.append(
            f"| {rate:g} | {_hours(od)} | {_money(od)} | {_hours(rv)} | {_pct(rv)} | {_money(rv)} "
            f"| {_hours(sc)} | {_money(sc)} |"
        )
    return "\n".join(lines)


def _with(base: Inputs, **changes: float) -> Inputs:
    return Inputs(**{**base.__dict__, **changes})


def plot(base: Inputs, path: Path) -> bool:
    """Write the two panels to `path`; False when matplotlib is not installed (`pip install .[bench]`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    top = max(base.rate_per_h, 1.0)
    rates = [top * i / 200 for i in range(201)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for interval in PLOT_INTERVALS_S:
        ys = [spot_revenant(_with(base, rate_per_h=r, interval_s=interval)).overhead_pct for r in rates]
        left.plot(rates, [math.nan if y is None else y for y in ys], label=f"every {interval:g} s")
    left.set(
        xlabel="interruptions per hour",
        ylabel="overhead % (freezes + moves + lost work)",
        title=f"spot + revenant, notice share {base.notice_share:g}",
    )
    left.legend()
    series = {
        "on-demand": on_demand,
        f"spot + revenant (every {base.interval_s:g} s)": spot_revenant,
        "spot, no checkpoints": spot_scratch,
    }
    for label, model in series.items():
        costs = [model(_with(base, rate_per_h=r)).cost for r in rates]
        right.plot(rates, [math.nan if c is None else c for c in costs], label=label)
    right.set(
        xlabel="interruptions per hour",
        ylabel=f"cost per {base.job_h:g} h job (spot {base.spot_price:g}/h, on-demand {base.od_price:g}/h)",
        title=f"cost per job (gaps: never finishes within {base.never_factor:g}x)",
    )
    right.set_yscale("log")  # the no-checkpoint curve grows exponentially; the others stay legible
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _rates(text: str) -> list[float]:
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"rates: a comma-separated list of numbers ({exc})") from exc
    if not rates or any(not math.isfinite(r) or r < 0 for r in rates):
        raise argparse.ArgumentTypeError("rates: one or more finite numbers >= 0")
    return rates


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job-h", type=float, default=DEFAULT_JOB_H, help="work the job needs, hours")
    ap.add_argument("--interval-s", type=float, default=DEFAULT_INTERVAL_S, help="checkpoint interval, s")
    ap.add_argument("--rates", type=_rates, default=list(DEFAULT_RATES), help="interruptions per hour, a,b,c")
    ap.add_argument("--freeze-s", type=float, default=DEFAULT_FREEZE_S, help="frozen time per checkpoint, s")
    ap.add_argument("--notice-to-commit-s", type=float, default=DEFAULT_NOTICE_TO_COMMIT_S)
    ap.add_argument("--restore-s", type=float, default=DEFAULT_RESTORE_S, help="restore to running, s")
    ap.add_argument("--restart-s", type=float, default=DEFAULT_RESTART_S, help="fresh start without checkpoint")
    ap.add_argument(
        "--notice-share", type=float, default=0.0, help="share of interruptions with a notice long enough (0-1)"
    )
    ap.add_argument("--spot-price", type=float, default=DEFAULT_SPOT_PRICE, help="per hour")
    ap.add_argument("--od-price", type=float, default=DEFAULT_OD_PRICE, help="on-demand, per hour")
    ap.add_argument("--never-factor", type=float, default=DEFAULT_NEVER_FACTOR, help='"never" beyond this x job')
    ap.add_argument("--png", type=Path, default=RESULTS_DIR / PNG_NAME, help="where the plot goes")
    ap.add_argument("--no-png", action="store_true")
    args = ap.parse_args(argv)
    try:
        base = Inputs(
            job_h=args.job_h,
            interval_s=args.interval_s,
            rate_per_h=max(args.rates),
            freeze_s=args.freeze_s,
            notice_to_commit_s=args.notice_to_commit_s,
            restore_s=args.restore_s,
            restart_s=args.restart_s,
            notice_share=args.notice_share,
            spot_price=args.spot_price,
            od_price=args.od_price,
            never_factor=args.never_factor,
        )
    except ValueError as exc:
        ap.error(str(exc))
    print(
        f"job {base.job_h:g} h, checkpoint every {base.interval_s:g} s, frozen {base.freeze_s:g} s each, "
        f"move {base.notice_to_commit_s:g} s notice->committed + {base.restore_s:g} s restore, "
        f"notice share {base.notice_share:g}, spot {base.spot_price:g}/h, on-demand {base.od_price:g}/h\n"
    )
    print(table(base, args.rates))
    if not args.no_png:
        if plot(base, args.png):
            print(f"\nplot: {args.png}")
        else:
            print("\nplot skipped: matplotlib is not installed (pip install '.[bench]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
