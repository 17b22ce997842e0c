"""CRIU image directories as a lazy restore sees them, for the lazy-pages tests and bench: a page source
reading the full dump's pages files, and a copy holding only the bytes a lazy restore reads locally."""

from __future__ import annotations

import shutil
from pathlib import Path

from shim.checkpoint.lazy_pages import LazyPlan


class FileSource:
    """The full checkpoint's pages files; after `fail_after` reads it raises, as a store that went away."""

    def __init__(self, full: Path, fail_after: int | None = None) -> None:
        self.full, self.fail_after, self.reads = full, fail_after, 0

    def read(self, name: str, offset: int, length: int) -> bytes:
        self.reads += 1
        if self.fail_after is not None and self.reads > self.fail_after:
            raise OSError("the store stopped answering")
        with open(self.full / name, "rb") as f:
            f.seek(offset)
            return f.read(length)


def sparse_copy(full: Path, dest: Path, plan: LazyPlan) -> None:
    """The images dir as the shim prepares it: every file, but the pages files only where the restore
    reads them locally; the lazy ranges stay holes."""
    shutil.copytree(full, dest, ignore=shutil.ignore_patterns("pages-*.img", "*.log"))
    for pages in full.glob("pages-*.img"):
        size = pages.stat().st_size
        with open(pages, "rb") as src, open(dest / pages.name, "wb") as dst:
            dst.truncate(size)
            for offset, length in plan.eager_ranges(pages.name, size):
                src.seek(offset)
                dst.seek(offset)
                dst.write(src.read(length))
