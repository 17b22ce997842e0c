"""`revenant rehearse`'s plain words for CRIU's failures, and its argument checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim.cli.rehearsal import DockerEngine, Interruption, Rehearsal, RehearsalPlan, RehearsalReport, explain


@pytest.mark.parametrize(
    ("criu", "words"),
    [
        ("Error (criu/sk-inet.c:191): inet: Connected TCP socket, consider using --tcp-established", "TCP connection"),
        ("Error (criu/fsnotify.c:287): fsnotify: Can't open file handle for 0x1", "inotify"),
        ("Error (criu/files-ext.c:95): Can't dump file 3 of that type [21e] (chr 10:200)", "device"),
        ("Error (criu/cr-dump.c:2111): Dumping FAILED.", None),
        ("Error (criu/files.c:1234): Can't open /dev/nvidia0: unsupported mapping", "device"),
        ("Error (criu/sk-unix.c:300): unix: Can't dump external unix socket, use --ext-unix-sk", "Unix socket"),
        ("no usable checkpoint: k@3: the image differs from the checkpoint's (digest a, b)", "image changed"),
    ],
)
def test_explain(criu: str, words: str | None) -> None:
    text = explain(criu)
    if words is None:  # nothing known: CRIU's own last line
        assert text == criu
    else:
        assert words in text, text


def test_plan_checks() -> None:
    plan = RehearsalPlan(image="i", command=["true"], store="file:///x", run_dir=Path("/nonexistent"))
    with pytest.raises(ValueError, match="interruptions"):
        Rehearsal(DockerEngine(), RehearsalPlan(**{**plan.__dict__, "interruptions": 0}))
    with pytest.raises(ValueError, match="--min"):
        Rehearsal(DockerEngine(), RehearsalPlan(**{**plan.__dict__, "min_s": 5, "max_s": 1}))


def test_report_ok_only_when_every_interruption_resumed() -> None:
    report = RehearsalReport("i", "docker", "k", "s")
    assert not report.ok  # nothing rehearsed is no success
    report.interruptions = [Interruption(1, 1.0, resumed=True), Interruption(2, 2.0, resumed=False, reason="why")]
    assert not report.ok
    assert "1/2 interruptions resumed: NOT OK" in str(report) and "why" in str(report)
    report.interruptions.pop()
    assert report.ok and report.to_dict()["ok"] is True
