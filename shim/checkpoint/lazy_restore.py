"""One lazy restore's life beside `runc restore --lazy-pages`: the daemon started before, watched after.

The restore returns as soon as CRIU has rebuilt the tree without its lazy memory; the job runs while the
page server (page_server.py) feeds the rest from a verifying source. If any page cannot be had, the
container is killed before the daemon lets go of its userfaultfds: a task must never run on with a page
it did not get (the kernel would give it zeros). `LazySession.done` is set once every page arrived or
the session failed; a checkpoint of the container waits for it (its memory is not all there before).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shim.runc.driver import Runc, RuncError

from .lazy_daemon import LazyPagesDaemon, LazyPagesError, start_lazy_pages
from .lazy_pages import lazy_plan
from .page_server import PageSource

log = logging.getLogger(__name__)

KILL = 9
SWITCH_INTERVAL_S = 0.0005


@dataclass(frozen=True)
class LazyRestore:
    """What a restore needs to take its memory lazily: the verified source of the lazy ranges of its
    pages files (names relative to the image dir), and who hears the end (None: every page arrived,
    else why not); `finished` is called exactly once, from the session's watcher thread. `running` is
    called once `runc restore` has returned and the job runs (e.g. to start fetching the rest ahead)."""

    source: PageSource
    finished: Callable[[str | None], None]
    running: Callable[[], None] | None = None


class LazySession:
    """A started lazy restore of one container: kills it when pages fail, reports the end once."""

    def __init__(self, runc: Runc, container_id: str, lazy: LazyRestore) -> None:
        self.runc = runc
        self.container_id = container_id
        self.lazy = lazy
        self.done = threading.Event()
        self.failure: str | None = None
        self._daemon: LazyPagesDaemon | None = None
        self._restored = threading.Event()  # runc has the container in its state: `runc kill` reaches it

    def start(self, image_dir: Path, work_dir: Path) -> None:
        """Start the daemon (before `runc restore --lazy-pages`, which connects to it in work_dir)."""
        # Every page request is a round trip through the GIL, which the store's workers hold while they
        # verify and decompress the read-ahead: at the default 5 ms switch interval the server thread
        # waited up to that long on each hand-off (20 MB/s). A faulting task waits on this thread.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self._daemon = start_lazy_pages(image_dir, work_dir, lazy_plan(image_dir), self.lazy.source, self._pages_failed)

    def restored(self) -> None:
        """`runc restore` returned: watch the transfer in a thread; a failure before now is raised."""
        self._restored.set()
        if self.failure is not None:
            self._kill()
            self._end(self.failure)
            raise LazyPagesError(f"lazy pages failed during the restore: {self.failure}")
        if self.lazy.running is not None:
            try:
                self.lazy.running()
            except Exception:  # the pages still come, each fetched when asked for
                log.exception("%s: the lazy restore's running callback raised", self.container_id)
        threading.Thread(target=self._watch, name=f"lazy-restore-{self.container_id}", daemon=True).start()

    def abort(self, reason: str) -> None:
        """`runc restore` failed: stop the daemon (nothing of the tree is left to fault)."""
        if self._daemon is not None:
            self._daemon.kill()
        self._end(reason)

    def _watch(self) -> None:
        assert self._daemon is not None
        try:
            stats = self._daemon.wait()
        except (LazyPagesError, OSError) as e:
            self._end(self.failure or str(e))
            return
        log.info("%s: every lazy page arrived (%d pages, %d requests)", self.container_id, stats.pages, stats.requests)
        self._end(None)

    def _pages_failed(self, reason: str) -> None:
        """The page server's on_failure: runs before it lets the daemon go."""
        self.failure = reason
        log.error("%s: lazy restore failed, killing the container: %s", self.container_id, reason)
        if self._restored.is_set():
            self._kill()
        # else: restored() kills it once runc has it in its state

    def _kill(self) -> None:
        try:
            self.runc.kill(self.container_id, KILL, all_processes=True)
        except RuncError as e:  # already gone (the job exited) is fine; anything else is logged
            log.warning("%s: kill after failed lazy pages: %s", self.container_id, e)

    def _end(self, failure: str | None) -> None:
        if self.done.is_set():
            return
        self.failure = failure
        self.done.set()
        try:
            self.lazy.finished(failure)
        except Exception:
            log.exception("%s: the lazy restore's finished callback raised", self.container_id)
