"""Pure functions of the store: key encodings, chunkers, chunk encoding, manifests."""

from __future__ import annotations

import itertools
import os
import re

import pytest

from shim.store.chunking import Chunker, decode_chunk, encode_chunk
from shim.store.errors import ManifestCorrupt
from shim.store.keys import decode_key, encode_key, tag_prefix
from shim.store.model import Manifest

TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


@pytest.mark.parametrize("key", ["default/mypod/main", "..", ".", "a b/ü/%2F", "-x", "k" * 300, "_"])
def test_key_encodings(key: str) -> None:
    enc = encode_key(key)
    assert decode_key(enc) == key and "/" not in enc and enc not in (".", "..")
    tag = tag_prefix(key) + "0000000001-abcdef012345"
    assert TAG.fullmatch(tag) and TAG.fullmatch(tag_prefix(key) + "latest")
    assert tag_prefix(key) != tag_prefix(key + "x")


def test_chunk_encoding_raw_when_incompressible() -> None:
    rnd, rep = os.urandom(65536), b"abc" * 20000
    assert encode_chunk(rnd)[0] == 0 and decode_chunk(encode_chunk(rnd), len(rnd)) == rnd
    assert encode_chunk(rep)[0] == 1 and decode_chunk(encode_chunk(rep), len(rep)) == rep


@pytest.mark.parametrize("spec", ["fixed:65536", "fastcdc:16384"])
def test_chunkers_cover_the_buffer(spec: str) -> None:
    buf = memoryview(os.urandom(1 << 20))
    cuts = list(Chunker.parse(spec).cuts(buf))
    assert cuts[0][0] == 0 and sum(n for _, n in cuts) == len(buf)
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(cuts))


def test_manifest_digest_detects_damage() -> None:
    m = Manifest("k", 1, None, 0.0, "fixed:65536", {}, [], {"bytes_read": 0})
    blob = m.encode()
    assert Manifest.decode(blob).key == "k"
    for bad in (blob[: len(blob) // 2], blob[:-1] + bytes([blob[-1] ^ 1]), b""):
        with pytest.raises(ManifestCorrupt):
            Manifest.decode(bad)
