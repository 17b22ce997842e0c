"""The agent's main loop: poll for notices, fan out checkpoints, serve metrics, stop cleanly.

Each distinct notice (by Notice.id) is acted on once: a notice stays visible on every poll until the
instance goes. A drain runs in its own thread so polling goes on during it: a terminate notice that
arrives while a rebalance (leave-running) drain runs starts its own final drain at once.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from shim.agent.drain import DrainReport, drain, plan_deadline
from shim.agent.metrics import Metrics, StatusServer
from shim.agent.notice import MetadataError, Notice, Watcher
from shim.progress import DEFAULT_LOG_INTERVAL_S, Reporter
from shim.protect.registry import list_tasks

log = logging.getLogger(__name__)


class Agent:
    def __init__(
        self,
        run_dir: str | Path,
        watcher: Watcher | None,
        poll_interval: float = 5.0,
        listen: tuple[str, int] | None = ("127.0.0.1", 9810),
        stale_after_s: float | None = None,
        progress_interval: float = DEFAULT_LOG_INTERVAL_S,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.progress_interval = progress_interval  # seconds between a drain's progress log lines
        self.watcher = watcher
        self.poll_interval = poll_interval
        self.metrics = Metrics(self.run_dir, watcher.provider if watcher else "none")
        self.server = StatusServer(listen, self.metrics, self.health) if listen is not None else None
        # Unhealthy once the metadata service has not answered for this long (a long-poll holds ~60 s).
        long_poll_s = float(getattr(watcher, "long_poll_timeout_s", 0)) if watcher and watcher.long_poll else 0.0
        self.stale_after_s = stale_after_s or max(30.0, 6 * poll_interval, 2 * long_poll_s)
        self.stop_event = threading.Event()
        self.reports: list[DrainReport] = []
        self._handled: set[str] = set()
        self._drains: list[tuple[threading.Thread, float]] = []  # (thread, wall-clock deadline)
        self._lock = threading.Lock()
        self._started = time.time()
        self._poller: threading.Thread | None = None
        self._poll_failures = 0

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self.server is not None:
            self.server.start()
            host, port = self.server.address
            log.info(
                "agent: metrics on http://%s:%d/metrics, health on /healthz",
                host,
                port,
                extra={"fields": {"event": "listening", "host": host, "port": port}},
            )
        if self.watcher is None:
            log.warning("agent: no notice provider; serving metrics only (use `revenant drain` by hand)")
            return
        self._poller = threading.Thread(target=self._poll_loop, name="agent-poll", daemon=True)
        self._poller.start()
        log.info("agent: watching %s notices (run dir %s)", self.watcher.provider, self.run_dir)

    def stop(self) -> None:
        """Stop polling, let running drains finish (each is bounded by its deadline), stop serving."""
        self.stop_event.set()
        with self._lock:
            drains = list(self._drains)
        for thread, deadline in drains:
            if thread.is_alive():
                log.info("agent: waiting for a running drain (up to %.0fs) before exiting", deadline - time.time())
                thread.join(max(0.0, deadline - time.time()) + 5.0)
        if self.server is not None:
            self.server.stop()
        log.info("agent: stopped")

    # ---- polling -------------------------------------------------------------------------------

    def _poll_loop(self) -> None:
        assert self.watcher is not None
        while not self.stop_event.is_set():
            notice = self.poll_once()
            if notice is not None:
                self.handle(notice)
            # A long-poll already waited inside poll(); a short pause only guards against a server
            # that answers long-polls at once.
            pause = min(self.poll_interval, 1.0) if self.watcher.long_poll else self.poll_interval
            self.stop_event.wait(pause)

    def poll_once(self) -> Notice | None:
        assert self.watcher is not None
        try:
            notice = self.watcher.poll()
        except MetadataError as exc:
            self.metrics.poll_failed()
            self._poll_failures += 1
            # Log the first failure and then every 60th, not one line per poll for hours.
            if self._poll_failures == 1 or self._poll_failures % 60 == 0:
                log.warning(
                    "agent: %s metadata poll failed (%d in a row): %s", self.watcher.provider, self._poll_failures, exc
                )
            return None
        except Exception:
            self.metrics.poll_failed()
            log.exception("agent: %s watcher failed", self.watcher.provider)
            return None
        if self._poll_failures:
            log.info("agent: metadata service answers again after %d failed poll(s)", self._poll_failures)
            self._poll_failures = 0
        self.metrics.poll_ok()
        return notice

    # ---- notices -------------------------------------------------------------------------------

    def handle(self, notice: Notice) -> threading.Thread | None:
        """Start the drain for a new notice; None if this notice was already acted on."""
        with self._lock:
            if notice.id in self._handled:
                return None
            self._handled.add(notice.id)
            deadline = plan_deadline(notice.deadline)
            thread = threading.Thread(target=self._drain_for, args=(notice, deadline), name="agent-drain", daemon=True)
            self._drains = [(t, d) for t, d in self._drains if t.is_alive()]
            self._drains.append((thread, deadline))
        self.metrics.notice_seen(notice)
        log.warning(
            "agent: %s notice, instance may go in %.0fs; %s checkpoint of every protected task",
            notice.describe(),
            notice.seconds_left(),
            "final" if notice.exit else "leave-running",
            extra={
                "fields": {
                    "event": "notice",
                    "provider": notice.provider,
                    "action": notice.action,
                    "deadline": notice.deadline,
                    "notice_id": notice.id,
                    "raw": notice.raw,
                }
            },
        )
        thread.start()
        return thread

    def _drain_for(self, notice: Notice, deadline: float) -> None:
        try:
            records = [r for r in list_tasks(self.run_dir) if not r.exited]
            # The agent's stderr is a log (JSON lines), never a live terminal line, whatever it is attached to.
            reporter = Reporter(
                "drain", tty=False, interval=self.progress_interval, counts_bytes=False, phase="checkpointing"
            )
            report = drain(
                records, exit=notice.exit, deadline=deadline, reason=f"{notice.describe()} notice", reporter=reporter
            )
            with self._lock:
                self.reports.append(report)
            self.metrics.drain_done(report, trigger=notice.action)
        except Exception:
            log.exception("agent: drain for %s failed", notice.describe())
        if notice.advisory or self.watcher is None:
            return
        try:
            self.watcher.acknowledge(notice)  # Azure: the node is ready, the eviction may proceed
        except MetadataError as exc:
            log.error("agent: cannot acknowledge %s notice: %s", notice.describe(), exc)

    # ---- health --------------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        now = time.time()
        info: dict[str, Any] = {
            "provider": self.watcher.provider if self.watcher else "none",
            "run_dir": str(self.run_dir),
        }
        with self._lock:
            if self.reports:
                last = self.reports[-1]
                info["last_drain"] = {"reason": last.reason, "finished": last.finished, "ok": last.ok}
        if self.watcher is None:
            return True, info
        last_ok = self.metrics.last_poll_ok
        info["last_poll_ok_age_s"] = None if last_ok is None else round(now - last_ok, 3)
        if self._poller is not None and not self._poller.is_alive() and not self.stop_event.is_set():
            info["error"] = "poll thread died"
            return False, info
        if now - (last_ok if last_ok is not None else self._started) > self.stale_after_s:
            info["error"] = f"metadata service has not answered for over {self.stale_after_s:.0f}s"
            return False, info
        return True, info
