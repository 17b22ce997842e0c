"""The streaming dump: the store consumes CRIU's page images while CRIU still writes them.

CRIU dumps into on-disk scratch (never tmpfs: a backlog there would be memory); a put of the growing
staging directory (shim.store.growing) runs on a thread from before the freeze until the checkpoint
is complete, so hashing, compression and upload overlap the dump and the extra memory of a
checkpoint stays near the budget whatever the dump's size. The producer's word decides completion:
the checkpointer calls finish() with the metadata once CRIU exited and the writable layer is
captured; any exception before that aborts the put, which then commits nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from shim.store.growing import GrowingTree

log = logging.getLogger(__name__)


def page_images(criu_dir: str) -> Callable[[str], bool]:
    """CRIU's pages-N.img files: written once, sequentially, never rewritten during a dump."""

    def is_page_image(rel: str) -> bool:
        name = rel.removeprefix(f"{criu_dir}/")
        return name != rel and "/" not in name and name.startswith("pages-") and name.endswith(".img")

    return is_page_image


class StreamedPut:
    """`with StreamedPut(...) as put: <dump into staging>; info = put.finish(metadata)`."""

    def __init__(
        self,
        store: Any,
        key: str,
        staging: Path,
        criu_dir: str,
        budget_bytes: int,
        progress: Callable[[int, int], None] | None,
        epoch: int | None,
        page_patterns: Sequence[str] = (),
    ) -> None:
        """page_patterns: the page images to dedup page by page (Store.put's page_images)."""
        self.tree = GrowingTree(staging, page_images(criu_dir))
        self._args = (store, key, progress, epoch, budget_bytes, tuple(page_patterns))
        self._thread = threading.Thread(target=self._run, name="revenant-stream-put", daemon=True)
        self._info: Any = None
        self._error: BaseException | None = None

    def _run(self) -> None:
        store, key, progress, epoch, budget, patterns = self._args
        try:
            self._info = store.put_growing(
                key, self.tree, progress=progress, epoch=epoch, budget=budget, page_images=patterns
            )
        except BaseException as e:  # handed to the checkpointer's thread in finish()
            self._error = e

    def __enter__(self) -> StreamedPut:
        self._thread.start()
        return self

    def frozen(self, on: bool) -> None:
        """The job is frozen (on) or runs again (off): while frozen the put yields the CPU to CRIU as
        long as its backlog allows (GrowingTree.set_frozen)."""
        self.tree.set_frozen(on)

    def finish(self, metadata: dict[str, Any]) -> Any:
        """The dump is complete: let the put read the rest and commit; its CheckpointInfo."""
        self.tree.finish(metadata)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._info

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self.tree.fail(exc)
        # Never leave the put reading a staging dir the caller is about to remove.
        self._thread.join()
