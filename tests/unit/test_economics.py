"""bench/economics.py: the spot cost model on cases worked out by hand, and its input checks."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

ECONOMICS = Path(__file__).resolve().parents[2] / "bench" / "economics.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_economics_under_test", ECONOMICS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


econ = load()
Inputs = econ.Inputs


def test_no_interruptions_costs_the_job_plus_its_freezes() -> None:
    inp = Inputs(job_h=1, interval_s=100, freeze_s=1, rate_per_h=0, spot_price=2)
    out = econ.spot_revenant(inp)
    assert out.wall_s == pytest.approx(3600 + 36)  # 36 checkpoints of 1 s
    assert out.overhead_pct == pytest.approx(1.0)
    assert out.cost == pytest.approx(3636 / 3600 * 2)
    assert econ.spot_scratch(inp).wall_s == pytest.approx(3600)
    assert econ.on_demand(inp).wall_s == pytest.approx(3600)


def test_unannounced_interruption_loses_half_an_interval_plus_the_restore() -> None:
    inp = Inputs(job_h=1, interval_s=600, freeze_s=0, restore_s=60, notice_share=0, rate_per_h=1)
    assert econ.loss_per_interruption_s(inp) == pytest.approx(300 + 60)
    # T = W / (1 - lambda L) = 3600 / (1 - 360/3600)
    assert econ.spot_revenant(inp).wall_s == pytest.approx(4000)


def test_announced_interruption_loses_only_the_move() -> None:
    inp = Inputs(
        job_h=1, interval_s=600, freeze_s=0, restore_s=60, notice_to_commit_s=120, notice_share=1, rate_per_h=1
    )
    assert econ.loss_per_interruption_s(inp) == pytest.approx(180)  # no work redone, whatever the interval
    assert econ.spot_revenant(inp).wall_s == pytest.approx(3600 / 0.95)
    half = Inputs(**{**inp.__dict__, "notice_share": 0.5})
    assert econ.loss_per_interruption_s(half) == pytest.approx((180 + 360) / 2)


def test_longer_interval_trades_freezes_for_lost_work() -> None:
    base = dict(job_h=10, freeze_s=1, restore_s=0, rate_per_h=0)
    quiet = [econ.spot_revenant(Inputs(interval_s=i, **base)).wall_s for i in (60, 600)]
    assert quiet[0] > quiet[1]  # no interruptions: fewer checkpoints win
    stormy = [econ.spot_revenant(Inputs(interval_s=i, **{**base, "rate_per_h": 2})).wall_s for i in (60, 600)]
    assert stormy[0] < stormy[1]  # frequent interruptions: losing less work wins


def test_revenant_never_finishes_when_each_hour_loses_an_hour() -> None:
    inp = Inputs(job_h=1, interval_s=720, freeze_s=0, restore_s=0, rate_per_h=10)  # 10 * 360 s = 1 h per h
    out = econ.spot_revenant(inp)
    assert (out.wall_s, out.cost, out.overhead_pct) == (None, None, None)


def test_restart_from_scratch_is_the_exponential_formula() -> None:
    assert econ.restart_from_scratch_s(3600, 1 / 3600, 0) == pytest.approx(3600 * (math.e - 1))
    assert econ.restart_from_scratch_s(3600, 1 / 3600, 36) == pytest.approx(3636 * (math.e - 1))
    assert econ.restart_from_scratch_s(3600, 0, 36) == 3600
    assert econ.restart_from_scratch_s(3600, 1, 0) == math.inf  # exp(3600) would overflow
    inp = Inputs(job_h=1, rate_per_h=1, restart_s=0)
    assert econ.spot_scratch(inp).wall_s == pytest.approx(3600 * (math.e - 1))


def test_restart_from_scratch_says_never_beyond_the_cap() -> None:
    # 24 h at one interruption an hour: (1 h)(e^24 - 1), about 2.6e10 h, far beyond 100 x 24 h
    assert econ.spot_scratch(Inputs(job_h=24, rate_per_h=1)).wall_s is None
    # the cap is the boundary: e - 1 = 1.72 x the job is kept at 2x, "never" at 1.5x
    assert econ.spot_scratch(Inputs(job_h=1, rate_per_h=1, restart_s=0, never_factor=2)).wall_s is not None
    assert econ.spot_scratch(Inputs(job_h=1, rate_per_h=1, restart_s=0, never_factor=1.5)).wall_s is None


def test_cost_ordering_with_the_measured_defaults() -> None:
    calm = Inputs(rate_per_h=0)
    # uninterrupted, spot without checkpoints is the cheapest: revenant pays its freezes
    assert econ.spot_scratch(calm).cost < econ.spot_revenant(calm).cost < econ.on_demand(calm).cost
    busy = Inputs(rate_per_h=0.1)
    assert econ.spot_revenant(busy).cost < econ.on_demand(busy).cost < econ.spot_scratch(busy).cost


def test_table_has_a_row_per_rate_and_says_never() -> None:
    text = econ.table(Inputs(), [0, 0.1, 1])
    rows = text.splitlines()
    assert len(rows) == 2 + 3
    assert rows[2].startswith("| 0 | 24.00 | 24.00 | 24.04 | 0.17 |")
    assert rows[4].startswith("| 1 |") and rows[4].endswith("| never | never |")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("job_h", 0),
        ("job_h", -1),
        ("interval_s", 0),
        ("rate_per_h", -0.1),
        ("freeze_s", -1),
        ("notice_to_commit_s", -1),
        ("restore_s", -1),
        ("restart_s", -1),
        ("spot_price", -1),
        ("od_price", -1),
        ("never_factor", 0.5),
        ("notice_share", 1.5),
        ("notice_share", -0.1),
        ("job_h", math.nan),
        ("interval_s", math.inf),
    ],
)
def test_bad_inputs_are_refused_by_name(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        Inputs(**{field: value})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--job-h", "0"], "job_h must be a finite number > 0"),
        (["--interval-s", "-5"], "interval_s must be a finite number > 0"),
        (["--notice-share", "2"], "notice_share must be between 0 and 1"),
        (["--rates", "0.1,x"], "rates: a comma-separated list of numbers"),
        (["--rates", "-1"], "rates: one or more finite numbers >= 0"),
    ],
)
def test_command_line_refuses_bad_inputs(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        econ.main([*argv, "--no-png"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_runs_and_imports_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    fresh = load()
    png = tmp_path / "economics.png"
    assert fresh.main(["--rates", "0,0.5", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| 0.5 | 24.00 |" in out and "matplotlib is not installed" in out
    assert not png.exists()
