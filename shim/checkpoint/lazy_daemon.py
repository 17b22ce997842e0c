"""Start and stop `criu lazy-pages` for one lazy restore, wired to our page server.

The daemon and the restore (`criu restore --lazy-pages` or `runc restore --lazy-pages`) meet on the unix
socket "lazy-pages.socket" in CRIU's work directory, so the daemon gets the same work dir the restore
will use (`runc restore --work-path W`). It reaches the page server over one end of a socketpair
(`--ps-socket FD`): no TCP port is opened on the node. `--status-fd` says when it listens. Once the
restore has handed it the tasks' userfaultfds it fills faults first and then pushes the remaining lazy
pages in the background; it exits 0 when every page has arrived.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .criu_log import error_lines
from .lazy_pages import LazyPlan
from .page_server import PageServer, PageServerError, PageServerStats, PageSource

log = logging.getLogger(__name__)

LOG_NAME = "lazy-pages.log"
SOCKET_NAME = "lazy-pages.socket"


class LazyPagesError(RuntimeError):
    """The lazy-pages daemon did not start or did not deliver every page."""


class _Once:
    """on_failure runs once, whichever of the page server and the daemon watcher notices first."""

    def __init__(self, fn: Callable[[str], None]) -> None:
        self._fn, self._lock, self._called = fn, threading.Lock(), False

    def __call__(self, reason: str) -> None:
        with self._lock:
            if self._called:
                return
            self._called = True
        self._fn(reason)


class LazyPagesDaemon:
    """A running `criu lazy-pages` and the page server thread feeding it.

    A watcher thread calls on_failure when the daemon exits non-zero: it may have flushed and hung up
    cleanly (CRIU disconnects on its own errors too) with pages left that its tasks will now fault in
    as zeros."""

    def __init__(
        self, proc: subprocess.Popen[bytes], server: PageServer, work_dir: Path, on_failure: Callable[[str], None]
    ) -> None:
        self.proc = proc
        self.server = server
        self.work_dir = work_dir
        self.started = time.monotonic()
        self._on_failure = on_failure
        self._watcher = threading.Thread(target=self._watch, name="lazy-pages-watch", daemon=True)

    def _watch(self) -> None:
        rc = self.proc.wait()
        if rc != 0:
            self.server.finished.wait(10)  # a page server failure reports first, with its own reason
            self._on_failure(f"criu lazy-pages exited {rc}: {self._errors()}")

    def wait(self, timeout: float | None = None) -> PageServerStats:
        """Wait until every lazy page has arrived (the daemon exits); raise LazyPagesError otherwise."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired as e:
            raise TimeoutError(f"criu lazy-pages still running after {timeout}s") from e
        try:
            stats = self.server.wait(timeout=10)
        except (PageServerError, TimeoutError) as e:
            raise LazyPagesError(f"page server: {e}") from e
        if rc != 0:
            raise LazyPagesError(f"criu lazy-pages exited {rc}: {self._errors()}")
        try:
            log_kib = (self.work_dir / LOG_NAME).stat().st_size >> 10
        except OSError:
            log_kib = -1
        log.info(
            "all lazy pages arrived %.3fs after the daemon started (its log: %d KiB)",
            time.monotonic() - self.started,
            log_kib,
        )
        return stats

    def kill(self) -> None:
        """Stop the daemon. Only after the restored tree is dead (its tasks would fault in zero pages) or
        when the restore failed: before the final flush this counts as a failure and calls on_failure."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.server.finished.wait(10)
        if self._watcher.is_alive():
            self._watcher.join(15)

    def _errors(self) -> str:
        return "; ".join(error_lines(self.work_dir / LOG_NAME)) or "no error lines in its log"


def start_lazy_pages(
    image_dir: Path,
    work_dir: Path,
    plan: LazyPlan,
    source: PageSource,
    on_failure: Callable[[str], None],
    *,
    criu: str = "criu",
    progress: Callable[[int, int], None] | None = None,
    timeout: float = 30.0,
) -> LazyPagesDaemon:
    """Start `criu lazy-pages` for `image_dir` and return once it listens on work_dir/lazy-pages.socket."""
    work_dir.mkdir(parents=True, exist_ok=True)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    status_r, status_w = os.pipe()
    cmd = [
        criu, "lazy-pages", "-D", str(image_dir), "--work-dir", str(work_dir), "-o", LOG_NAME, "-v4",
        "--page-server", "--ps-socket", str(theirs.fileno()), "--status-fd", str(status_w),
    ]  # fmt: skip
    try:
        proc = subprocess.Popen(
            cmd,
            pass_fds=(theirs.fileno(), status_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except BaseException:
        for s in (ours, theirs):
            s.close()
        os.close(status_r)
        raise
    finally:
        os.close(status_w)
    theirs.close()
    once = _Once(on_failure)
    server = PageServer(ours, plan, source, once, progress)
    daemon = LazyPagesDaemon(proc, server, work_dir, once)
    try:
        ready, _, _ = select.select([status_r], [], [], timeout)
        if not ready or os.read(status_r, 1) != b"\0":
            proc.kill()
            proc.wait()
            raise LazyPagesError(f"criu lazy-pages did not start: {daemon._errors()}")
    except BaseException:
        ours.close()
        raise
    finally:
        os.close(status_r)
    server.start()
    daemon._watcher.start()
    log.info("criu lazy-pages %d listens in %s (%d lazy pages)", proc.pid, work_dir, plan.total_pages)
    return daemon
