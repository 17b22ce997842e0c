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
