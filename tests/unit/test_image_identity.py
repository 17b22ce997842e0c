"""A restore must be onto the image the checkpoint was taken on: another image's, or one that does
not say, is refused with the reason."""

from __future__ import annotations

import pytest

from shim.protect.image_identity import ImageIdentity

NOW = ImageIdentity("docker.io/team/trainer:v2", "sha256:" + "b" * 64, "sha256:" + "c" * 64)


def test_the_same_image_restores() -> None:
    assert NOW.differs_from(NOW.as_dict()) is None


@pytest.mark.parametrize(
    ("recorded", "says"),
    [
        ({**NOW.as_dict(), "digest": "sha256:" + "a" * 64}, "digest"),
        ({**NOW.as_dict(), "base": "sha256:" + "d" * 64}, "base"),
        ({**NOW.as_dict(), "digest": ""}, "digest unknown at checkpoint"),  # recorded without a digest
        ({"name": "x"}, "digest unknown"),
        (None, "records no image"),
        ({}, "records no image"),
        ("sha256:x", "records no image"),
    ],
)
def test_another_or_an_unknown_image_is_refused(recorded, says) -> None:
    reason = NOW.differs_from(recorded)  # type: ignore[arg-type]
    assert reason is not None and says in reason, reason
