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


class LazyPagesDaemon:
    """A running `criu lazy-pages` and the page server thread feeding it."""

    def __init__(self, proc: subprocess.Popen[bytes], server: PageServer, work_dir: Path) -> None:
        self.proc = proc
        self.server = server
        self.work_dir = work_dir
        self.started = time.monotonic()

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
        log.info("all lazy pages arrived %.3fs after the daemon started", time.monotonic() - self.started)
        return stats

    def kill(self) -> None:
        """Stop the daemon. Only after the restored tree is dead (its tasks would fault in zero pages) or
        when the restore failed: before the final flush this counts as a failure and calls on_failure."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.server.finished.wait(10)

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
    server = PageServer(ours, plan, source, on_failure, progress)
    daemon = LazyPagesDaemon(proc, server, work_dir)
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
    log.info("criu lazy-pages %d listens in %s (%d lazy pages)", proc.pid, work_dir, plan.total_pages)
    return daemon
