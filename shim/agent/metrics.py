"""Prometheus metrics (text exposition format 0.0.4, written by hand) and the health endpoint.

Counters and the duration histogram come from what the agent itself did; the per-task gauges
(last checkpoint age, size, duration) are read from the node registry at every scrape, so they also
cover the shims' periodic checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from shim.agent.drain import DrainReport
from shim.agent.notice import Notice
from shim.protect.registry import list_tasks

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Family:
    def __init__(self, name: str, kind: str, help: str) -> None:
        self.name, self.kind, self.help = name, kind, help
        self.lines: list[str] = []

    def add(self, value: float, labels: Labels = (), suffix: str = "") -> None:
        self.lines.append(f"{self.name}{suffix}{_labels(labels)} {_num(value)}")

    def render(self) -> str:
        head = f"# HELP {self.name} {self.help}\n# TYPE {self.name} {self.kind}\n"
        return head + "".join(line + "\n" for line in self.lines)


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1


class Metrics:
    """The agent's own counters; thread-safe. render() adds the registry gauges."""

    def __init__(self, run_dir: str | Path, provider: str = "none") -> None:
        self.run_dir = Path(run_dir)
        self.provider = provider
        self._lock = threading.Lock()
        self._started = time.time()
        self._notices: dict[Labels, int] = {}
        self._poll_errors = 0
        self._last_poll_ok: float | None = None
        self._results: dict[Labels, int] = {}
        self._durations: dict[Labels, _Histogram] = {}
        self._bytes_uploaded: dict[Labels, int] = {}
        self._drains: dict[Labels, int] = {}
        self._last_drain: float | None = None

    # ---- recording -----------------------------------------------------------------------------

    def poll_ok(self) -> None:
        with self._lock:
            self._last_poll_ok = time.time()

    def poll_failed(self) -> None:
        with self._lock:
            self._poll_errors += 1

    def notice_seen(self, notice: Notice) -> None:
        labels = (("provider", notice.provider), ("action", notice.action))
        with self._lock:
            self._notices[labels] = self._notices.get(labels, 0) + 1

    def drain_done(self, report: DrainReport, trigger: str) -> None:
        with self._lock:
            self._last_drain = report.finished
            dl = (("trigger", trigger), ("result", "ok" if report.ok else "failed"))
            self._drains[dl] = self._drains.get(dl, 0) + 1
            for res in report.results:
                rl = (("trigger", trigger), ("result", res.status))
                self._results[rl] = self._results.get(rl, 0) + 1
                tl = (("trigger", trigger),)
                if res.status == "ok":
                    self._durations.setdefault(tl, _Histogram(DURATION_BUCKETS)).observe(res.duration_s)
                    self._bytes_uploaded[tl] = self._bytes_uploaded.get(tl, 0) + (res.bytes_uploaded or 0)

    @property
    def last_poll_ok(self) -> float | None:
        with self._lock:
            return self._last_poll_ok

    # ---- exposition ----------------------------------------------------------------------------

    def render(self) -> str:
        now = time.time()
        fams: list[_Family] = []

        def family(name: str, kind: str, help: str) -> _Family:
            fam = _Family(name, kind, help)
            fams.append(fam)
            return fam

        with self._lock:
            family("revenant_agent_start_time_seconds", "gauge", "When the agent started (epoch).").add(self._started)
            family("revenant_agent_provider_info", "gauge", "The metadata provider the agent watches.").add(
                1, (("provider", self.provider),)
            )
            fam = family("revenant_agent_notices_total", "counter", "Interruption notices acted on.")
            for labels, n in sorted(self._notices.items()):
                fam.add(n, labels)
            family("revenant_agent_metadata_poll_errors_total", "counter", "Metadata service polls that failed.").add(
                self._poll_errors
            )
            if self._last_poll_ok is not None:
                family(
                    "revenant_agent_last_poll_success_timestamp_seconds",
                    "gauge",
                    "When the metadata service last answered (epoch).",
                ).add(self._last_poll_ok)
            fam = family("revenant_agent_drains_total", "counter", "Checkpoint fan-outs, by trigger and outcome.")
            for labels, n in sorted(self._drains.items()):
                fam.add(n, labels)
            if self._last_drain is not None:
                family(
                    "revenant_agent_last_drain_timestamp_seconds", "gauge", "When the last fan-out finished (epoch)."
                ).add(self._last_drain)
            fam = family(
                "revenant_agent_checkpoints_total",
                "counter",
                "Task checkpoints requested by the agent, by trigger and result (ok, failed, timed_out).",
            )
            for labels, n in sorted(self._results.items()):
                fam.add(n, labels)
            fam = family(
                "revenant_agent_checkpoint_failures_total",
                "counter",
                "Task checkpoints requested by the agent that failed or timed out.",
            )
            for labels, n in sorted(self._results.items()):
                if dict(labels)["result"] != "ok":
                    fam.add(n, labels)
            fam = family(
                "revenant_agent_checkpoint_bytes_uploaded_total",
                "counter",
                "Bytes uploaded to the store by agent-requested checkpoints.",
            )
            for labels, n in sorted(self._bytes_uploaded.items()):
                fam.add(n, labels)
            fam = family(
                "revenant_agent_checkpoint_duration_seconds",
                "histogram",
                "Duration of successful agent-requested checkpoints, request to answer.",
            )
            for labels, hist in sorted(self._durations.items()):
                for bound, count in zip(hist.buckets, hist.counts, strict=True):  # already cumulative
                    fam.add(count, (*labels, ("le", _num(bound))), "_bucket")
                fam.add(hist.count, (*labels, ("le", "+Inf")), "_bucket")
                fam.add(hist.sum, labels, "_sum")
                fam.add(hist.count, labels, "_count")

        tasks = list_tasks(self.run_dir)
        family("revenant_protected_tasks", "gauge", "Protected tasks in the node registry.").add(len(tasks))
        age = family(
            "revenant_task_last_checkpoint_age_seconds",
            "gauge",
            "Seconds since the task's last committed checkpoint (absent: none yet).",
        )
        seq = family("revenant_task_last_checkpoint_seq", "gauge", "Sequence number of the last checkpoint.")
        size = family(
            "revenant_task_last_checkpoint_bytes_uploaded", "gauge", "Bytes the last checkpoint uploaded to the store."
        )
        dur = family("revenant_task_last_checkpoint_duration_seconds", "gauge", "Duration of the last checkpoint.")
        err = family("revenant_task_last_checkpoint_error", "gauge", "1 if the task's last checkpoint attempt failed.")
        for rec in tasks:
            labels: Labels = (("namespace", rec.namespace), ("id", rec.id), ("key", rec.key))
            # A Kubernetes pod's container also carries its pod, the pod's namespace and its name
            # (`namespace` stays containerd's, as for every task).
            kube = (("pod", rec.pod), ("pod_namespace", rec.pod_namespace), ("container", rec.container))
            labels += tuple((k, v) for k, v in kube if v)
            err.add(1 if rec.last_error else 0, labels)
            if rec.last_checkpoint is not None:
                age.add(max(0.0, now - rec.last_checkpoint.time), labels)
                seq.add(rec.last_checkpoint.seq, labels)
                size.add(rec.last_checkpoint.bytes_uploaded, labels)
                dur.add(rec.last_checkpoint.duration_s, labels)
        return "".join(f.render() for f in fams)


class StatusServer:
    """GET /metrics and /healthz on a background thread."""

    def __init__(self, listen: tuple[str, int], metrics: Metrics, health: Callable[[], tuple[bool, dict[str, Any]]]):
        metrics_ref, health_ref = metrics, health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    try:
                        body = metrics_ref.render().encode()
                    except Exception as exc:  # a scrape must not take the agent down
                        log.exception("metrics: render failed")
                        self._send(500, f"metrics failed: {exc}\n".encode(), "text/plain")
                        return
                    self._send(200, body, CONTENT_TYPE)
                elif path == "/healthz":
                    healthy, info = health_ref()
                    body = (json.dumps({"status": "ok" if healthy else "unhealthy", **info}) + "\n").encode()
                    self._send(200 if healthy else 503, body, "application/json")
                else:
                    self._send(404, b"not found: try /metrics or /healthz\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("http: " + format, *args)

        self._httpd = ThreadingHTTPServer(listen, Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="agent-http", daemon=True
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5.0)
