"""Which staged files a streamed checkpoint consumes while CRIU still writes them."""

from __future__ import annotations

import pytest

from shim.protect.streaming import page_images


@pytest.mark.parametrize(
    "rel, tailed",
    [
        ("criu/pages-1.img", True),
        ("criu/pages-12.img", True),
        ("criu/pagemap-1.img", False),  # rewritten as CRIU goes: read once the dump is complete
        ("criu/core-1.img", False),
        ("pages-1.img", False),  # outside the CRIU dir
        ("criu/sub/pages-1.img", False),
        ("layer/criu/pages-1.img", False),
        ("criu/pages-1.img.tmp", False),
    ],
)
def test_only_criu_page_images_are_tailed(rel: str, tailed: bool) -> None:
    assert page_images("criu")(rel) is tailed


def test_page_by_page_dedup_unless_the_page_table_could_outgrow_its_bound() -> None:
    from shim.protect.checkpointer import PAGE_IMAGES, streamed_page_images
    from shim.store.limits import MAX_PAGE_TABLE_BYTES

    covered = MAX_PAGE_TABLE_BYTES // 16 * 4096  # bytes of pages one page table covers
    assert streamed_page_images(4 << 30) == PAGE_IMAGES
    assert streamed_page_images(covered // 2) == PAGE_IMAGES
    assert streamed_page_images(covered // 2 + (1 << 20)) == ()  # room left for a job growing mid-dump
