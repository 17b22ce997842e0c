"""Property-based fuzzing of the store's decoders: any input decodes to something valid or raises the
store's own error, and a manifest that decodes never makes a restore write outside its destination."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from harness.store_util import frame_manifest, host_digest, write_manifest
from shim.store import StoreError, open_store
from shim.store.chunking import CHUNK_RAW, CHUNK_ZSTD, ChunkDecodeError, decode_chunk, encode_chunk
from shim.store.errors import ManifestCorrupt
from shim.store.model import FORMAT, Manifest, check_entry_path

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)
# Path pieces an attacker would use, plus ordinary names.
path_parts = st.sampled_from(["a", "b", "..", ".", "", "/", "etc", "x" * 256, "\x00", "lnk", "d", "é"])
paths = st.lists(path_parts, min_size=1, max_size=5).map(lambda ps: "/".join(ps)) | st.sampled_from(
    ["/etc/passwd", "../x", "a/../../b", "lnk/f", "d/e/f"]
)


def entry_strategy() -> st.SearchStrategy[dict]:
    base = st.fixed_dictionaries(
        {
            "path": paths,
            "mode": st.integers(-1, 0o20000) | st.just(0o755),
            "mtime": st.floats(allow_nan=True) | st.just(0.0),
            "uid": st.integers(-1, 2**33) | st.just(0),
            "gid": st.integers(-1, 2**33) | st.just(0),
        }
    )
    kinds = st.sampled_from(["file", "dir", "symlink", "fifo", None])

    def finish(e: dict, kind: str | None, target: str, size: int, extra: object) -> dict:
        e = {**e, "type": kind}
        if kind == "symlink":
            e["target"] = target
        if kind == "file":
            e["size"] = size
            e["chunks"] = [[0, size, "zero"]] if size > 0 else []
        if extra is not None:
            e["extra"] = extra
        return e

    return st.builds(finish, base, kinds, paths, st.integers(-1, 1 << 20), st.none() | json_values)


def plausible_entry() -> st.SearchStrategy[dict]:
    """Entries close to what scan_tree writes, so many manifests decode and the restore itself is fuzzed."""

    def build(path: str, kind: str, mode: int, owner: int, target: str, size: int) -> dict:
        e = {"path": path, "type": kind, "mode": mode, "mtime": 0.0, "uid": owner, "gid": owner}
        if kind == "symlink":
            e["target"] = target
        if kind == "file":
            e["size"] = size
            e["chunks"] = [[0, size, "zero"]] if size else []
        return e

    return st.builds(
        build,
        st.sampled_from(["a", "b", "d", "d/x", "d/y", "d/e", "d/e/f", "lnk", "lnk/f", "a/b"]),
        st.sampled_from(["file", "dir", "dir", "symlink"]),
        st.sampled_from([0o4777, 0o6755, 0o1777, 0o755, 0o600, 0o777, 0]),
        st.sampled_from([0, 1000, 2**32 - 2]),
        st.sampled_from(["a", "d/x", "../x", "/etc", "d/../..", "..", "d/e/../../a"]),
        st.integers(0, 1 << 20),
    )


def manifest_docs() -> st.SearchStrategy[object]:
    good = st.fixed_dictionaries(
        {
            "format": st.just(FORMAT) | st.text(max_size=5),
            "key": st.just("fuzz/key"),
            "seq": st.just(2),
            "parent": st.none() | st.integers(-1, 3),
            "created": st.just(1.0) | st.floats(),
            "chunker": st.just("fixed:65536"),
            "metadata": st.just({}) | json_values,
            "stats": st.just({}) | json_values,
            "entries": st.lists(entry_strategy(), max_size=8),
        }
    )
    return good | json_values


@FUZZ
@given(doc=manifest_docs())
def test_manifest_decoder_accepts_only_valid_documents(doc: object) -> None:
    blob = frame_manifest(json.dumps(doc).encode())
    try:
        m = Manifest.decode(blob)
    except ManifestCorrupt:
        return
    for e in m.entries:  # whatever decodes satisfies the path rules and has a known type
        check_entry_path(e["path"])
        assert e["type"] in ("file", "dir", "symlink")


@FUZZ
@given(payload=st.binary(max_size=2000), zstd=st.booleans())
def test_manifest_decoder_on_arbitrary_payloads(payload: bytes, zstd: bool) -> None:
    body = zstandard.ZstdCompressor().compress(payload) if zstd else payload
    with pytest.raises(ManifestCorrupt):  # random bytes are never a valid manifest
        Manifest.decode(frame_manifest(payload=body))
    raw = frame_manifest(payload=body)
    for cut in (0, 5, len(raw) // 2):
        with pytest.raises(ManifestCorrupt):
            Manifest.decode(raw[:cut] + raw[cut + 1 :] if cut < len(raw) else raw[:cut])


@FUZZ
@given(blob=st.binary(max_size=4096), expected=st.integers(0, 1 << 16))
def test_chunk_decoder_on_arbitrary_bytes(blob: bytes, expected: int) -> None:
    for b in (blob, bytes([CHUNK_ZSTD]) + blob, bytes([CHUNK_RAW]) + blob):
        try:
            data = decode_chunk(b, expected)
        except ChunkDecodeError:
            continue
        assert len(data) == expected


@FUZZ
@given(
    data=st.binary(max_size=8192),
    flips=st.lists(st.tuples(st.integers(0, 64), st.integers(1, 255)), max_size=4),
    declared=st.integers(0, 1 << 30),
    expected=st.integers(0, 1 << 14),
)
def test_chunk_decoder_on_forged_frames(data: bytes, flips: list, declared: int, expected: int) -> None:
    """Real zstd frames with damaged headers or lying sizes: bounded output, own error otherwise."""
    frames = [encode_chunk(data * 4)]
    cctx = zstandard.ZstdCompressor(write_content_size=False)
    frames.append(bytes([CHUNK_ZSTD]) + cctx.compress(data * 4))
    lying = bytearray(encode_chunk(bytes(64)))  # a frame whose header declares a content size
    frames.append(bytes(lying))
    for f in frames:
        f = bytearray(f)
        for pos, x in flips:
            if pos < len(f):
                f[pos] ^= x
        for exp in (expected, len(data) * 4, declared):
            try:
                out = decode_chunk(bytes(f), exp)
            except ChunkDecodeError:
                continue
            assert len(out) == exp


@pytest.fixture(scope="module")
def fuzz_store(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("store-fuzz")
    host = work / "host"
    (host / "etc").mkdir(parents=True, exist_ok=True)
    (host / "etc" / "passwd").write_text("root")
    return open_store(f"file://{work}/store"), host, host_digest(host), work


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    entries=st.one_of(
        st.lists(st.one_of(plausible_entry(), entry_strategy()), max_size=8),
        # parents first and no duplicates, as scan_tree writes them: most of these restore
        st.lists(plausible_entry(), max_size=8, unique_by=lambda e: e["path"]).map(
            lambda es: sorted(es, key=lambda e: e["path"].count("/"))
        ),
    )
)
def test_restore_of_any_decodable_manifest_stays_inside(fuzz_store, entries: list[dict]) -> None:
    store, host, before, work = fuzz_store
    doc = {
        "format": FORMAT,
        "key": "fuzz/key",
        "seq": 2,
        "parent": None,
        "created": 1.0,
        "chunker": "fixed:65536",
        "metadata": {},
        "stats": {},
        "entries": entries,
    }
    write_manifest(store, "fuzz/key", 2, frame_manifest(json.dumps(doc).encode()))
    parent = Path(tempfile.mkdtemp(dir=work))
    dest = parent / "dest"
    try:
        store.get("fuzz/key", dest, seq=2)
    except StoreError:
        assert not dest.exists()
    else:
        for dirpath, dirnames, filenames in os.walk(dest):
            for name in dirnames + filenames:
                st_ = os.lstat(Path(dirpath) / name)
                assert st_.st_mode & 0o7022 == 0 or os.path.islink(Path(dirpath) / name)
    assert sorted(os.listdir(parent)) in ([], ["dest"])  # no partial dir left, nothing beside dest
    assert host_digest(host) == before
    event("restored" if dest.exists() else "refused")
