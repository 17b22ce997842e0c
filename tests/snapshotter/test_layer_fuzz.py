"""Property-based fuzzing of the writable-layer applier: any tar either applies inside the upper dir or
raises LayerError, and nothing outside the upper dir ever changes."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from harness.store_util import host_digest
from shim.layer import LayerError, apply_writable_layer

FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))

names = st.lists(
    st.sampled_from(["a", "b", "d", "..", ".", "", "lnk", ".wh.a", ".wh..wh..opq", ".wh.", "x" * 256, "é"]),
    min_size=1,
    max_size=4,
).map("/".join) | st.sampled_from(["/etc/passwd", "../host/f", "lnk/f", "d/../../host"])
targets = st.sampled_from(["a", "../..", "/etc", "d/../../x", "lnk", "d", "", "../host/f"])
kinds = st.sampled_from(
    [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE]
)
members = st.tuples(
    names,
    kinds,
    targets,
    st.binary(max_size=64),
    st.sampled_from([0o4755, 0o644, 0o777, 0o1777]),
    st.dictionaries(
        st.sampled_from(["SCHILY.xattr.user.x", "SCHILY.xattr.trusted.overlay.opaque", "SCHILY.xattr.security.a"]),
        st.text(max_size=4),
        max_size=2,
    ),
)


def build_tar(spec: list[tuple]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, target, data, mode, pax in spec:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.pax_headers = kind, mode, dict(pax)
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                ti.linkname = target
            if kind == tarfile.REGTYPE:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """A scratch dir for the cases and, beside them, a sentinel host tree no case may change."""
    root = tmp_path_factory.mktemp("layer-fuzz")
    host = root / "host"
    (host / "etc").mkdir(parents=True)
    (host / "f").write_text("host file")
    return root, host, host_digest(host)


def _apply(work: tuple[Path, Path, dict], tar: bytes) -> None:
    root, host, before = work
    case = Path(tempfile.mkdtemp(dir=root))
    (case / "layer.tar").write_bytes(tar)
    upper = case / "upper"
    upper.mkdir()
    try:
        apply_writable_layer(case / "layer.tar", upper)
        event("applied")
    except LayerError:
        event("refused")
    finally:
        assert host_digest(host) == before
        assert sorted(os.listdir(case)) == ["layer.tar", "upper"]
        shutil.rmtree(case)


@FUZZ
@given(spec=st.lists(members, max_size=6))
def test_layer_applier_on_generated_tars(work: tuple[Path, Path, dict], spec: list[tuple]) -> None:
    _apply(work, build_tar(spec))


@FUZZ
@given(
    spec=st.lists(members, min_size=1, max_size=3),
    flips=st.lists(st.tuples(st.integers(0, 4095), st.integers(1, 255)), min_size=1, max_size=6),
    cut=st.none() | st.integers(0, 4096),
)
def test_layer_applier_on_damaged_tars(
    work: tuple[Path, Path, dict], spec: list[tuple], flips: list, cut: int | None
) -> None:
    tar = bytearray(build_tar(spec))
    for pos, x in flips:
        if pos < len(tar):
            tar[pos] ^= x
    _apply(work, bytes(tar[:cut] if cut is not None else tar))
