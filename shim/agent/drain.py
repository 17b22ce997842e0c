"""The drain executor: checkpoint every task in the node registry at once, within one deadline.

Only tasks listed in the registry are touched: the agent learns each shim's ttrpc address from its
record and calls revenant.v1.Control/Checkpoint there. Every task gets its own thread and connection,
so one hung or dead shim costs nobody else time; each call carries the time left to the deadline, so
the drain as a whole ends by then whatever the shims do.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from revenant_pb.revenant.v1 import control_pb2
from shim.progress import Reporter
from shim.protect.registry import TaskRecord
from shim.ttrpc import NAMESPACE_KEY, Client, Code, DeadlineExceeded, ServiceClient, TtrpcError

log = logging.getLogger(__name__)

CONTROL_API = control_pb2.DESCRIPTOR.services_by_name["Control"]
OK, FAILED, TIMED_OUT = "ok", "failed", "timed_out"

# Leave this share of the notice window (bounded below and above) between our deadline and the
# provider's: the instance may go a little early, and results still have to be logged/acknowledged.
MARGIN_FRACTION = 0.2
MIN_MARGIN_S = 1.0
MAX_MARGIN_S = 10.0
MIN_ATTEMPT_S = 2.0
# The shim is asked to finish a little before the call times out, so its own error text arrives.
SHIM_SLACK_S = 0.5


def plan_deadline(notice_deadline: float, now: float | None = None) -> float:
    """Our wall-clock deadline for a notice's checkpoints: the notice's, less a safety margin.

    Never less than MIN_ATTEMPT_S from now: a notice seen late (its time already near or past) still
    gets a try, since the instance evidently still runs and a checkpoint is all there is to gain.
    """
    now = time.time() if now is None else now
    window = max(0.0, notice_deadline - now)
    margin = min(MAX_MARGIN_S, max(MIN_MARGIN_S, window * MARGIN_FRACTION))
    return now + max(MIN_ATTEMPT_S, window - margin)


@dataclass
class TaskResult:
    namespace: str
    id: str
    key: str
    address: str
    status: str  # OK, FAILED or TIMED_OUT
    error: str | None = None
    duration_s: float = 0.0  # as the agent saw it, connect to answer
    seq: int | None = None
    bytes_read: int | None = None
    bytes_uploaded: int | None = None
    freeze_s: float | None = None
    total_s: float | None = None  # as the shim measured it
    freeze: dict[str, float] | None = None  # where the frozen milliseconds went (shim.protect.freeze)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.id}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DrainReport:
    reason: str
    exit: bool
    deadline: float  # wall clock
    started: float
    finished: float = 0.0
    results: list[TaskResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.status == OK for r in self.results)

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)

    def to_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "exit": self.exit,
            "deadline": self.deadline,
            "started": self.started,
            "finished": self.finished,
            "ok": self.ok,
            "tasks": [r.to_dict() for r in self.results],
        }


def _base_result(record: TaskRecord, status: str, error: str | None = None) -> TaskResult:
    return TaskResult(record.namespace, record.id, record.key, record.address, status, error)


def _freeze_breakdown(stats_json: str) -> dict[str, float] | None:
    """The breakdown of the frozen window in a shim's checkpoint statistics; None from a shim that
    sends none (an older one) or sends something else there."""
    try:
        freeze = json.loads(stats_json or "{}").get("freeze")
    except (ValueError, AttributeError):
        return None
    if not isinstance(freeze, dict):
        return None
    return {str(k): float(v) for k, v in freeze.items() if isinstance(v, int | float)}


def checkpoint_task(
    record: TaskRecord, *, exit: bool, deadline: float, reason: str, connect_timeout: float = 2.0
) -> TaskResult:
    """Checkpoint one task through its shim; never raises, the outcome is in the result."""
    start = time.monotonic()
    left = deadline - time.time()
    if left <= 0:
        return _base_result(record, TIMED_OUT, "deadline passed before the checkpoint could start")
    result: TaskResult
    try:
        with Client(record.address, timeout=min(connect_timeout, left)) as client:
            left = deadline - time.time()
            if left <= 0:
                raise DeadlineExceeded("deadline passed while connecting to the shim")
            request = control_pb2.CheckpointRequest(
                id=record.id, exit=exit, reason=reason, timeout_ms=int(max(0.1, left - SHIM_SLACK_S) * 1000)
            )
            control = ServiceClient(client, CONTROL_API, {NAMESPACE_KEY: record.namespace})
            resp = control.Checkpoint(request, timeout=left)
        result = _base_result(record, OK)
        result.seq = resp.seq
        result.bytes_read = resp.bytes_read
        result.bytes_uploaded = resp.bytes_uploaded
        result.freeze_s = resp.freeze_s
        result.total_s = resp.total_s
        result.freeze = _freeze_breakdown(resp.stats_json)
    except DeadlineExceeded as exc:
        if "no answer within" in exc.message:  # our own call timed out (not the shim's verdict)
            text = f"no answer from the shim within {max(0.0, left):.1f}s (deadline)"
        else:
            text = f"deadline exceeded: {exc.message}"
        result = _base_result(record, TIMED_OUT, text)
    except TtrpcError as exc:
        code = exc.code.name if isinstance(exc.code, Code) else f"code {exc.code}"  # a code we do not know
        result = _base_result(record, FAILED, f"{code}: {exc.message}")
    except TimeoutError as exc:  # the connect itself (a shim that accepts nothing)
        result = _base_result(record, TIMED_OUT, f"cannot connect to shim at {record.address}: {exc}")
    except (ConnectionError, OSError, ValueError) as exc:
        result = _base_result(record, FAILED, f"cannot reach shim at {record.address}: {exc}")
    except Exception as exc:  # a bug must not cost the other tasks their report
        log.exception("drain: checkpoint of %s failed unexpectedly", record.ref)
        result = _base_result(record, FAILED, f"{type(exc).__name__}: {exc}")
    result.duration_s = time.monotonic() - start
    return result


def drain(
    records: Iterable[TaskRecord],
    *,
    exit: bool,
    deadline: float,
    reason: str,
    connect_timeout: float = 2.0,
    reporter: Reporter | None = None,
) -> DrainReport:
    """Checkpoint every record concurrently; returns when all answered or the deadline passed.

    `reporter` (started and closed here) shows how many tasks answered and the time to the deadline
    while the shims work: they report no bytes on the way, so there is no rate or ETA to give."""
    records = list(records)
    report = DrainReport(reason=reason, exit=exit, deadline=deadline, started=time.time())
    results: dict[int, TaskResult] = {}
    lock = threading.Lock()

    def progress_detail() -> str:
        with lock:
            answered = list(results.values())
        failed = sum(1 for r in answered if r.status != OK)
        text = f"{len(answered)}/{len(records)} tasks answered"
        if failed:
            text += f" ({failed} not ok)"
        return f"{text}, deadline in {max(0.0, deadline - time.time()):.0f}s"

    def run(index: int, record: TaskRecord) -> None:
        res = checkpoint_task(record, exit=exit, deadline=deadline, reason=reason, connect_timeout=connect_timeout)
        with lock:
            results[index] = res

    threads = [
        threading.Thread(target=run, args=(i, rec), name=f"drain-{rec.ref}", daemon=True)
        for i, rec in enumerate(records)
    ]
    log.info(
        "drain: checkpointing %d protected task(s), exit=%s, %.1fs to deadline, reason %r",
        len(records),
        exit,
        deadline - time.time(),
        reason,
    )
    if reporter is not None:
        reporter.detail(progress_detail)
        reporter.start()
    try:
        for t in threads:
            t.start()
        for t in threads:
            # Every call is bounded by the deadline; the extra second only covers thread scheduling.
            t.join(max(0.0, deadline - time.time()) + 1.0)
    finally:
        if reporter is not None:
            reporter.close()
    with lock:
        for i, rec in enumerate(records):
            res = results.get(i) or _base_result(rec, TIMED_OUT, "no answer by the deadline")
            report.results.append(res)
    report.finished = time.time()
    for res in report.results:
        level = logging.INFO if res.status == OK else logging.ERROR
        log.log(
            level,
            "drain: %s %s%s",
            res.ref,
            res.status,
            f": {res.error}" if res.error else "",
            extra={"fields": {"event": "checkpoint_result", "reason": reason, "exit": exit, **res.to_dict()}},
        )
    log.info(
        "drain: done in %.1fs: %d ok, %d failed, %d timed out",
        report.finished - report.started,
        report.count(OK),
        report.count(FAILED),
        report.count(TIMED_OUT),
        extra={"fields": {"event": "drain_summary", **{k: v for k, v in report.to_dict().items() if k != "tasks"}}},
    )
    return report
