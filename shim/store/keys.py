"""Safe, reversible encodings of checkpoint keys (which contain `/`) for object names and OCI tags."""

from __future__ import annotations

import re

import blake3

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def validate_key(key: str) -> str:
    if not key or len(key) > 1024 or "\x00" in key:
        raise ValueError(f"invalid checkpoint key {key!r}: must be 1-1024 characters without NUL")
    return key


def encode_key(key: str) -> str:
    """Percent-encode everything but [A-Za-z0-9_-]: one path segment, never '.' or '..', reversible."""
    return "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in validate_key(key))


def decode_key(encoded: str) -> str:
    """Inverse of encode_key; ValueError for anything encode_key would not have produced (a stray name)."""
    out = bytearray()
    i = 0
    while i < len(encoded):
        if encoded[i] == "%":
            hexpair = encoded[i + 1 : i + 3]
            if len(hexpair) != 2 or not all(c in "0123456789ABCDEF" for c in hexpair):
                raise ValueError(f"not an encoded key: {encoded[:80]!r}")
            out.append(int(hexpair, 16))
            i += 3
        elif encoded[i] in _SAFE:
            out += encoded[i].encode()
            i += 1
        else:
            raise ValueError(f"not an encoded key: {encoded[:80]!r}")
    key = out.decode()  # UnicodeDecodeError is a ValueError
    if encode_key(key) != encoded:
        raise ValueError(f"not an encoded key: {encoded[:80]!r}")
    return key


NAME_MAX = 255
_HASHED_SEP = "~"  # never produced by encode_key: marks a shortened, hashed name


def key_dir_name(key: str) -> str:
    """One directory name (at most NAME_MAX bytes) for key: encode_key, or for a long key a readable
    prefix of it plus '~' and a 128-bit key hash (then the key is not recoverable from the name: the
    file backend stores it beside the manifests).
    """
    enc = encode_key(key)
    if len(enc) <= NAME_MAX:
        return enc
    cut = 200
    while "%" in enc[cut - 2 : cut]:  # never split a %XX escape
        cut -= 1
    return f"{enc[:cut]}{_HASHED_SEP}{blake3.blake3(key.encode()).hexdigest()[:32]}"


def is_hashed_dir_name(name: str) -> bool:
    return _HASHED_SEP in name


def key_hash(key: str) -> str:
    return blake3.blake3(key.encode()).hexdigest()[:12]


def tag_prefix(key: str) -> str:
    """OCI tag prefix for a key: readable slug + key hash (slug alone is lossy), then '.'.

    Tags are `<prefix><seq:010d>-<nonce>` and `<prefix>latest`, all within the OCI tag grammar
    `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
    """
    slug = _TAG_UNSAFE.sub("_", validate_key(key)).lstrip(".-")[:80] or "_"
    return f"{slug}.{key_hash(key)}."
