"""Progress for people on long store and checkpoint work: rate, ETA and phase.

`Meter` is the maths (a smoothed byte rate and the ETA it implies) over an injectable clock, so it is
tested without sleeping. `Reporter` shows a meter: on a terminal one stderr line rewritten in place,
cleared at the end; anywhere else (a log file, journald, a container runtime's log) one structured log
line every `interval` seconds, with the same figures as `key=value` text and as `fields` for the
agent's JSON formatter. Work whose bytes nobody can count (a checkpoint running inside a shim, reached
over ttrpc) gets a reporter without byte counts: phase and elapsed time, never invented numbers.

It sits at the bottom of the layering (only the standard library) so the CLI, the agent's drain and
the protection layer can all use it.
"""

from __future__ import annotations

import io
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

log = logging.getLogger(__name__)

Clock = Callable[[], float]
MIB = 1 << 20
GIB = 1 << 30
DEFAULT_LOG_INTERVAL_S = 5.0
DEFAULT_REDRAW_S = 0.2
# Below this a transfer is stalled, not slow: no ETA rather than one of weeks.
MIN_RATE_BPS = 1.0


def format_duration(seconds: float | None) -> str:
    """`7s`, `2m05s`, `1h03m`; `?` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_bytes(n: float) -> str:
    """Bytes mostly in MiB (the unit the rate uses, so the two read together); small amounts in B or
    KiB, large ones in GiB."""
    if n < 1024:
        return f"{n:.0f} B"
    if n < MIB:
        return f"{n / 1024:.1f} KiB"
    if n < GIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / GIB:.2f} GiB"


def format_rate(bytes_per_s: float | None) -> str:
    return "? MiB/s" if bytes_per_s is None else f"{bytes_per_s / MIB:.1f} MiB/s"


@dataclass(frozen=True)
class Snapshot:
    """What a meter knows at one instant. done/total are None where no byte counts exist."""

    elapsed: float
    done: int | None = None
    total: int | None = None  # None or 0: unknown
    rate: float | None = None  # bytes/s, smoothed; None before any measurement
    eta: float | None = None  # seconds; None when total or rate is unknown, or nothing moves

    @property
    def fraction(self) -> float | None:
        if self.done is None or not self.total:
            return None
        return min(1.0, self.done / self.total)


class Meter:
    """Bytes done against time: an exponentially smoothed rate and the ETA it gives.

    The rate is a time-weighted moving average (time constant `tau` seconds) of the rate between
    samples, so a burst or a pause moves it smoothly rather than making the ETA jump about; samples
    closer than `min_dt` are folded into the next one (the store reports once per chunk, from many
    threads, often microseconds apart). Until the first full sample the rate is the plain average since
    the start. With no progress at all the rate decays towards zero and the ETA becomes unknown.
    """

    def __init__(self, clock: Clock = time.monotonic, tau: float = 3.0, min_dt: float = 0.25) -> None:
        self.clock = clock
        self.tau = tau
        self.min_dt = min_dt
        self.start = clock()
        self.done = 0
        self.updated = False  # no byte count yet (still scanning, listing, connecting)
        self.total: int | None = None
        self._rate: float | None = None
        self._sample_t = self.start
        self._sample_done = 0
        self._lock = threading.Lock()

    def update(self, done: int, total: int | None = None) -> None:
        with self._lock:
            self.updated = True
            self.done = max(self.done, done)  # callbacks from several threads may arrive out of order
            if total is not None:
                self.total = total
            self._sample(self.clock())

    def _sample(self, now: float) -> None:
        dt = now - self._sample_t
        if dt < self.min_dt:
            return
        instant = (self.done - self._sample_done) / dt
        if self._rate is None:
            # The first sample covers everything since the start: its average is the best guess.
            self._rate = instant
        else:
            alpha = 1.0 - math.exp(-dt / self.tau)
            self._rate += alpha * (instant - self._rate)
        self._sample_t, self._sample_done = now, self.done

    def snapshot(self) -> Snapshot:
        with self._lock:
            now = self.clock()
            self._sample(now)  # time passing without progress lowers the rate too
            elapsed = now - self.start
            rate = self._rate
            if rate is None and elapsed > 0 and self.done:
                rate = self.done / elapsed
            eta = None
            if self.total and self.done >= self.total:
                eta = 0.0
            elif self.total and rate is not None and rate >= MIN_RATE_BPS:
                eta = (self.total - self.done) / rate
            if not self.updated:
                return Snapshot(elapsed=elapsed)
            return Snapshot(elapsed=elapsed, done=self.done, total=self.total or None, rate=rate, eta=eta)


def progress_text(label: str, phase: str, snap: Snapshot, detail: str = "") -> str:
    """The one line a person reads: `put upload 3.0 MiB / 12.0 MiB 25% 9.1 MiB/s ETA 1s (elapsed 0s)`."""
    parts = [label]
    if phase:
        parts.append(phase)
    if snap.done is not None:
        if snap.total:
            parts.append(f"{format_bytes(snap.done)} / {format_bytes(snap.total)} {snap.fraction or 0:.0%}")
        else:
            parts.append(format_bytes(snap.done))
        parts.append(format_rate(snap.rate))
        parts.append(f"ETA {format_duration(snap.eta)}")
    if detail:
        parts.append(detail)
    parts.append(f"elapsed {format_duration(snap.elapsed)}")
    return "  ".join(parts)


def progress_fields(label: str, phase: str, snap: Snapshot, **extra: Any) -> dict[str, Any]:
    """The same figures for a log line's machine-readable fields (plain units: bytes, seconds)."""
    fields: dict[str, Any] = {"event": "progress", "label": label, "phase": phase, "elapsed_s": round(snap.elapsed, 2)}
    if snap.done is not None:
        fields["done_bytes"] = snap.done
        fields["total_bytes"] = snap.total
        fields["rate_bps"] = None if snap.rate is None else round(snap.rate)
        fields["eta_s"] = None if snap.eta is None else round(snap.eta, 1)
    fields.update(extra)
    return fields


def logfmt(fields: dict[str, Any]) -> str:
    """`key=value` pairs, values with spaces quoted: greppable in plain-text logs."""
    out = []
    for k, v in fields.items():
        text = "-" if v is None else str(v)
        out.append(f'{k}="{text}"' if (" " in text or not text) else f"{k}={text}")
    return " ".join(out)


@dataclass(frozen=True)
class Summary:
    """The end of a transfer, for its one-line summary."""

    label: str
    bytes: int
    elapsed: float
    uploaded: int | None = None  # bytes written to the store (after dedup and compression)
    chunks_total: int | None = None
    chunks_new: int | None = None

    @property
    def rate(self) -> float:
        return self.bytes / self.elapsed if self.elapsed > 0 else 0.0

    def text(self) -> str:
        line = f"{self.label}: {format_bytes(self.bytes)} in {self.elapsed:.2f}s ({format_rate(self.rate)})"
        if self.uploaded is not None:
            line += f"; uploaded {format_bytes(self.uploaded)}"
        if self.chunks_total is not None and self.chunks_new is not None:
            line += f", reused {self.chunks_total - self.chunks_new}/{self.chunks_total} chunks"
        if self.uploaded is not None:
            ratio = self.bytes / self.uploaded if self.uploaded else float("inf")
            line += f" (dedup ratio {ratio:.2f})" if math.isfinite(ratio) else " (all reused)"
        return line

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event": "progress_done",
            "label": self.label,
            "bytes": self.bytes,
            "elapsed_s": round(self.elapsed, 3),
            "rate_bps": round(self.rate),
        }
        if self.uploaded is not None:
            out["uploaded_bytes"] = self.uploaded
        if self.chunks_total is not None and self.chunks_new is not None:
            out["chunks_reused"] = self.chunks_total - self.chunks_new
            out["chunks_total"] = self.chunks_total
        return out


class Reporter:
    """Shows a Meter while work runs; usable directly as the store's `progress(done, total)` callback.

    tty=None asks the stream. On a terminal the line is redrawn at most every `redraw` seconds (the
    first report and a phase change draw at once); elsewhere a log line goes out every `interval`
    seconds, the first one `interval` seconds in, so quick work logs nothing but its summary (0 or
    less: no lines at all). `start()` runs a ticker thread so the line and the log keep coming while
    nothing reports (a scan, a commit, a shim working): elapsed time grows and the rate falls to zero.
    """

    def __init__(
        self,
        label: str,
        *,
        stream: TextIO | None = None,
        tty: bool | None = None,
        interval: float = DEFAULT_LOG_INTERVAL_S,
        redraw: float = DEFAULT_REDRAW_S,
        clock: Clock = time.monotonic,
        logger: logging.Logger | None = None,
        phase: str = "",
        counts_bytes: bool = True,
    ) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream) if tty is None else tty
        self.interval = interval
        self.redraw = redraw
        self.clock = clock
        self.logger = logger or log
        self.meter = Meter(clock)
        self.counts_bytes = counts_bytes
        self._phase = phase
        self._detail: str | Callable[[], str] = ""
        self._bytes_phase: str | None = None
        self._full_phase: str | None = None
        self._last_emit: float | None = None
        self._drawn_width = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- inputs ------------------------------------------------------------------------------------
    def __call__(self, done: int, total: int) -> None:
        self.meter.update(done, total)
        phase = self._full_phase if (self._full_phase and total and done >= total) else self._bytes_phase
        if phase is not None and self._phase != phase:
            with self._lock:
                self._phase = phase
            self.tick(force=True)
        else:
            self.tick()

    def phase(self, name: str, *, detail: str | Callable[[], str] | None = None) -> None:
        """Enter a phase: drawn at once on a terminal; in a log it shows in the next periodic line."""
        with self._lock:
            self._phase = name
            if detail is not None:
                self._detail = detail
        self.tick(force=True)

    def detail(self, text: str | Callable[[], str]) -> None:
        """Extra words on the line (e.g. `2/5 tasks answered`), shown at the next tick; a callable is
        asked at every tick (for figures that move by themselves, like the time to a deadline)."""
        with self._lock:
            self._detail = text

    def bytes_phase(self, name: str, *, when_full: str | None = None) -> None:
        """The phase to switch to when byte counts arrive (e.g. `scan` -> `upload`), and the one once
        every byte is done (e.g. `commit`: the manifest is still to be written)."""
        self._bytes_phase, self._full_phase = name, when_full

    # -- output ------------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        snap = self.meter.snapshot()
        if not self.counts_bytes:
            return Snapshot(elapsed=snap.elapsed)
        return snap

    def tick(self, force: bool = False) -> None:
        """Draw or log if due; `force` redraws a terminal line now (a log line keeps its interval)."""
        now = self.clock()
        with self._lock:
            if self._closed:
                return
            if self.tty:
                if not force and self._last_emit is not None and now - self._last_emit < self.redraw:
                    return
            else:
                last = self.meter.start if self._last_emit is None else self._last_emit
                if self.interval <= 0 or now - last < self.interval:
                    return
            self._last_emit = now
            snap = self.snapshot()
            detail = self._detail() if callable(self._detail) else self._detail
            if self.tty:
                self._draw(progress_text(self.label, self._phase, snap, detail))
            else:
                fields = progress_fields(self.label, self._phase, snap)
                if detail:
                    fields["detail"] = detail
                self.logger.info("progress %s", logfmt(_without_event(fields)), extra={"fields": fields})

    def _draw(self, text: str) -> None:
        # A line longer than the terminal wraps, and "\r" then rewrites only its last row.
        width = _columns(self.stream)
        if width and len(text) >= width:
            text = text[: width - 1]
        pad = max(0, self._drawn_width - len(text))
        try:
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
        except (OSError, ValueError):  # a closed terminal must not fail the transfer
            return
        self._drawn_width = len(text)

    def _clear(self) -> None:
        if self.tty and self._drawn_width:
            try:
                self.stream.write("\r" + " " * self._drawn_width + "\r")
                self.stream.flush()
            except (OSError, ValueError):
                pass
            self._drawn_width = 0

    def start(self) -> Reporter:
        """Tick in the background (the figures move even while no byte is reported)."""
        self.tick(force=True)
        # Off a terminal, tick a few times per interval: a wake-up a hair early must not cost a line.
        period = self.redraw if self.tty else min(1.0, self.interval / 4)
        if period > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, args=(period,), name="progress", daemon=True)
            self._thread.start()
        return self

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            self.tick()

    def close(self) -> None:
        """Stop ticking and clear the terminal line (idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            self._closed = True
            self._clear()

    def log_summary(self, summary: Summary) -> None:
        """Off a terminal, the summary as one more structured line, so a run's log ends with its
        totals. On a terminal the caller prints `summary.text()` with its own output."""
        if not self.tty and self.interval > 0:
            fields = summary.fields()
            self.logger.info("progress done %s", logfmt(_without_event(fields)), extra={"fields": fields})

    def __enter__(self) -> Reporter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def enable_log_lines(stream: TextIO | None = None) -> None:
    """For a command line: let the progress lines (info) out even where logging shows only warnings
    or is not set up at all (then they get their own stderr handler)."""
    log.setLevel(logging.INFO)
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False


def _without_event(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k != "event"}


def _columns(stream: TextIO) -> int | None:
    try:
        return os.get_terminal_size(stream.fileno()).columns or None
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return None


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False
