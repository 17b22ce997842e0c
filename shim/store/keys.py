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
    out = bytearray()
    i = 0
    while i < len(encoded):
        if encoded[i] == "%":
            out.append(int(encoded[i + 1 : i + 3], 16))
            i += 3
        else:
            out += encoded[i].encode()
            i += 1
    return out.decode()


def key_hash(key: str) -> str:
    return blake3.blake3(key.encode()).hexdigest()[:12]


def tag_prefix(key: str) -> str:
    """OCI tag prefix for a key: readable slug + key hash (slug alone is lossy), then '.'.

    Tags are `<prefix><seq:010d>-<nonce>` and `<prefix>latest`, all within the OCI tag grammar
    `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
    """
    slug = _TAG_UNSAFE.sub("_", validate_key(key)).lstrip(".-")[:80] or "_"
    return f"{slug}.{key_hash(key)}."
