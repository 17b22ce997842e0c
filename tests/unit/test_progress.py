"""shim.progress: the rate/ETA maths and the two ways of showing them, on a fake clock."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import struct
import termios

import pytest

from shim.progress import GIB, MIB, Meter, Reporter, Summary, format_bytes, format_duration, progress_text


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def feed(meter: Meter, clock: FakeClock, *, start: int, rate: float, seconds: int, total: int) -> int:
    """One update a second at `rate` bytes/s; returns the bytes done."""
    done = start
    for _ in range(seconds):
        clock.advance(1.0)
        done += int(rate)
        meter.update(done, total)
    return done


def test_steady_rate_gives_rate_and_eta() -> None:
    clock = FakeClock()
    meter = Meter(clock)
    feed(meter, clock, start=0, rate=10 * MIB, seconds=4, total=100 * MIB)
    snap = meter.snapshot()
    assert snap.rate == pytest.approx(10 * MIB)
    assert snap.eta == pytest.approx(6.0)
    assert snap.fraction == pytest.approx(0.4)
    assert snap.elapsed == pytest.approx(4.0)


def test_rate_is_smoothed_not_jumping_to_the_last_sample() -> None:
    clock = FakeClock()
    meter = Meter(clock, tau=3.0)
    done = feed(meter, clock, start=0, rate=10 * MIB, seconds=10, total=1000 * MIB)
    feed(meter, clock, start=done, rate=20 * MIB, seconds=1, total=1000 * MIB)
    after_one = meter.snapshot().rate
    assert after_one is not None and 10 * MIB < after_one < 15 * MIB  # one second of 20 moves it part way
    done = feed(meter, clock, start=done + 20 * MIB, rate=20 * MIB, seconds=20, total=1000 * MIB)
    assert meter.snapshot().rate == pytest.approx(20 * MIB, rel=0.01)  # and it converges


def test_reports_microseconds_apart_do_not_make_a_wild_rate() -> None:
    clock = FakeClock()
    meter = Meter(clock)
    clock.advance(1.0)
    meter.update(MIB, 10 * MIB)
    for i in range(100):  # a burst of chunk callbacks within 1 ms
        clock.advance(0.00001)
        meter.update(MIB + i * 1024, 10 * MIB)
    rate = meter.snapshot().rate
    assert rate is not None and rate < 2 * MIB


def test_unknown_total_has_rate_but_no_eta_or_percentage() -> None:
    clock = FakeClock()
    meter = Meter(clock)
    feed(meter, clock, start=0, rate=5 * MIB, seconds=3, total=0)
    snap = meter.snapshot()
    assert snap.total is None and snap.fraction is None and snap.eta is None
    assert snap.rate == pytest.approx(5 * MIB)
    text = progress_text("put k", "upload", snap)
    assert "15.0 MiB" in text and "5.0 MiB/s" in text and "ETA ?" in text and "%" not in text


def test_zero_rate_has_no_eta_and_a_stall_decays_to_none() -> None:
    clock = FakeClock()
    meter = Meter(clock)
    clock.advance(2.0)
    meter.update(0, 10 * MIB)
    snap = meter.snapshot()
    assert snap.rate == 0 and snap.eta is None
    assert "ETA ?" in progress_text("get k", "download", snap)

    stalled = Meter(clock)
    done = feed(stalled, clock, start=0, rate=MIB, seconds=3, total=10 * MIB)
    clock.advance(5.0)
    slower = stalled.snapshot()
    assert slower.rate is not None and slower.rate < MIB and slower.eta is not None and slower.eta > 7
    clock.advance(600.0)  # nothing for ten minutes: stalled, not "ETA in weeks"
    assert stalled.snapshot().eta is None and stalled.done == done


def test_no_bytes_reported_yet_means_no_byte_figures() -> None:
    clock = FakeClock()
    meter = Meter(clock)
    clock.advance(3.0)
    snap = meter.snapshot()
    assert snap.done is None and snap.rate is None
    assert progress_text("put k", "scan", snap) == "put k  scan  elapsed 3s"


def test_done_means_eta_zero() -> None:
    clock = FakeClock()
    meter = Meter(clock)
    feed(meter, clock, start=0, rate=MIB, seconds=4, total=4 * MIB)
    assert meter.snapshot().eta == 0.0


def test_finish_summary_says_bytes_time_rate_and_dedup() -> None:
    s = Summary("put k seq 2", 64 * MIB, 4.0, uploaded=16 * MIB, chunks_total=100, chunks_new=25)
    assert s.text() == (
        "put k seq 2: 64.0 MiB in 4.00s (16.0 MiB/s); uploaded 16.0 MiB, reused 75/100 chunks (dedup ratio 4.00)"
    )
    assert s.fields() == {
        "event": "progress_done",
        "label": "put k seq 2",
        "bytes": 64 * MIB,
        "elapsed_s": 4.0,
        "rate_bps": 16 * MIB,
        "uploaded_bytes": 16 * MIB,
        "chunks_reused": 75,
        "chunks_total": 100,
    }
    again = Summary("put k seq 3", 64 * MIB, 0.5, uploaded=0, chunks_total=100, chunks_new=0)
    assert again.text().endswith("uploaded 0 B, reused 100/100 chunks (all reused)")
    get = Summary("get k seq 3", 3 * MIB, 0.0)
    assert get.text() == "get k seq 3: 3.0 MiB in 0.00s (0.0 MiB/s)"


def test_format_bytes() -> None:
    assert [format_bytes(x) for x in (0, 1023, 1536, 5 * MIB, 1023 * MIB, 3 * GIB // 2)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "5.0 MiB",
        "1023.0 MiB",
        "1.50 GiB",
    ]


def test_format_duration() -> None:
    assert [format_duration(x) for x in (None, -1, 0.4, 59.4, 125, 3725, float("inf"))] == [
        "?",
        "?",
        "0s",
        "59s",
        "2m05s",
        "1h02m",
        "?",
    ]


def test_terminal_line_is_rewritten_in_place_throttled_and_cleared() -> None:
    clock = FakeClock()
    out = io.StringIO()
    rep = Reporter("put k", stream=out, tty=True, redraw=0.5, clock=clock, phase="scan")
    rep.bytes_phase("upload", when_full="commit")
    rep.tick(force=True)
    assert out.getvalue() == "\rput k  scan  elapsed 0s"
    clock.advance(1.0)
    rep(MIB, 4 * MIB)  # phase change: drawn at once
    clock.advance(0.1)
    rep(2 * MIB, 4 * MIB)  # within the redraw period: not drawn
    draws = out.getvalue().split("\r")[1:]
    assert len(draws) == 2
    assert draws[1].startswith("put k  upload  1.0 MiB / 4.0 MiB 25%  1.0 MiB/s  ETA 3s")
    clock.advance(1.0)
    rep(4 * MIB, 4 * MIB)
    assert "commit" in out.getvalue().split("\r")[-1]
    width = len(out.getvalue().split("\r")[-1])
    rep.close()
    assert out.getvalue().endswith("\r" + " " * width + "\r")
    rep.tick(force=True)  # after close nothing more is drawn
    assert out.getvalue().endswith("\r" + " " * width + "\r")
    assert "\n" not in out.getvalue()


def test_log_lines_come_every_interval_with_the_figures(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    out = io.StringIO()
    rep = Reporter("get k", stream=out, tty=False, interval=5.0, clock=clock, phase="download")
    with caplog.at_level(logging.INFO, logger="shim.progress"):
        for _ in range(12):  # 12 s of 1 MiB/s reported every second: lines at 5 s and 10 s
            clock.advance(1.0)
            rep(rep.meter.done + MIB, 20 * MIB)
        rep.close()
        rep.log_summary(Summary("get k seq 1", 12 * MIB, 12.0))
    assert out.getvalue() == ""  # nothing drawn
    records = [r for r in caplog.records if r.name == "shim.progress"]
    assert len(records) == 3
    fields = [r.fields for r in records]  # type: ignore[attr-defined]
    assert [f["done_bytes"] for f in fields[:2]] == [5 * MIB, 10 * MIB]
    assert fields[1]["total_bytes"] == 20 * MIB and fields[1]["phase"] == "download"
    assert fields[1]["rate_bps"] == pytest.approx(MIB, rel=0.01) and fields[1]["eta_s"] == pytest.approx(10, rel=0.02)
    assert "phase=download" in records[1].getMessage() and "done_bytes=10485760" in records[1].getMessage()
    assert fields[2]["event"] == "progress_done" and fields[2]["bytes"] == 12 * MIB
    assert records[2].getMessage().startswith("progress done label=")


def test_quick_work_logs_only_its_summary(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    rep = Reporter("put k", stream=io.StringIO(), tty=False, interval=5.0, clock=clock, phase="scan")
    rep.bytes_phase("upload", when_full="commit")
    with caplog.at_level(logging.INFO, logger="shim.progress"):
        rep.start()
        clock.advance(0.5)
        rep(MIB, 2 * MIB)
        rep.phase("commit")
        clock.advance(0.5)
        rep(2 * MIB, 2 * MIB)
        rep.close()
        rep.log_summary(Summary("put k seq 1", 2 * MIB, 1.0))
    assert [r.fields["event"] for r in caplog.records] == ["progress_done"]  # type: ignore[attr-defined]


def test_interval_zero_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    rep = Reporter("put k", stream=io.StringIO(), tty=False, interval=0, clock=clock)
    with caplog.at_level(logging.INFO, logger="shim.progress"):
        rep.start()
        clock.advance(10)
        rep(MIB, 2 * MIB)
        rep.close()
        rep.log_summary(Summary("put k seq 1", 2 * MIB, 10.0))
    assert [r for r in caplog.records if r.name == "shim.progress"] == []


def test_remote_work_shows_phase_and_elapsed_never_numbers(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    out = io.StringIO()
    tty = Reporter("checkpoint", stream=out, tty=True, clock=clock, counts_bytes=False, phase="shim checkpointing")
    clock.advance(75)
    tty.detail("deadline in 525s")
    tty.tick(force=True)
    assert out.getvalue() == "\rcheckpoint  shim checkpointing  deadline in 525s  elapsed 1m15s"
    log_rep = Reporter("drain", tty=False, interval=1.0, clock=clock, counts_bytes=False, phase="checkpointing")
    log_rep.detail("1/3 tasks answered")
    with caplog.at_level(logging.INFO, logger="shim.progress"):
        log_rep.tick()  # not due yet
        clock.advance(1.0)
        log_rep.tick()
    (record,) = caplog.records
    assert record.fields == {  # type: ignore[attr-defined]
        "event": "progress",
        "label": "drain",
        "phase": "checkpointing",
        "elapsed_s": 1.0,
        "detail": "1/3 tasks answered",
    }


def test_terminal_line_is_cut_to_the_terminal_width() -> None:
    master, slave = pty.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 40, 0, 0))
        with os.fdopen(os.dup(slave), "w") as stream:
            rep = Reporter("put " + "a-very-long-key/" * 4, stream=stream, tty=True, clock=FakeClock())
            rep(MIB, 4 * MIB)
        drawn = os.read(master, 4096).decode()
    finally:
        os.close(master)
        os.close(slave)
    assert drawn.startswith("\rput a-very-long-key/") and len(drawn) == 1 + 39  # no wrap: \r redraws it all
