"""Encryption at rest: keyed chunk ids, sealed chunks and manifests, keys from 0600 key files.

Per key file (32 random bytes, raw or hex or base64), HKDF-SHA256 derives one subkey per purpose:
- chunk ids: BLAKE3 in keyed mode, so an id says nothing about the data to someone without the key, and
  equal data under one key still has one id (dedup is kept);
- chunk payloads (after compression): AES-256-GCM, a random 96-bit nonce each, the chunk id and key id
  as associated data (a chunk cannot be passed off as another);
- manifests: AES-256-GCM under their own subkey; the outer framing keeps the format version and key id
  readable, so a reader picks the right key of several (rotation: the first key of a keyring seals new
  data, every key listed opens old data).
The key id is the first 8 bytes of BLAKE3(constant) keyed with the key: it names the key, reveals nothing.
Random nonces stay safe up to ~2^32 seals per key; at 64 KiB per chunk that is 256 TiB of new chunks.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from pathlib import Path

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import KeyMismatch, StoreError
from .limits import SEAL_OVERHEAD
from .private_file import read_private_file

KEY_LEN = 32
MAX_KEY_FILE = 4096  # the longest form, 64 hex digits or base64, plus whitespace: far below
NONCE_LEN = 12
KEY_ID_LEN = 8
CHUNK_SEALED = 0xE1  # first byte of a sealed chunk; plain chunks start with 0 (raw) or 1 (zstd)
MANIFEST_MAGIC = b"RVNSEALED1 "  # then 16 hex chars of key id, '\n', nonce, AES-GCM(plain manifest)
_CHUNK_AAD = b"revenant chunk v1 "
CHUNK_OVERHEAD = 1 + KEY_ID_LEN + NONCE_LEN + 16  # marker, key id, nonce, GCM tag
assert CHUNK_OVERHEAD <= SEAL_OVERHEAD


class StoreKey:
    """One key file's subkeys."""

    def __init__(self, secret: bytes, source: str = "") -> None:
        if len(secret) != KEY_LEN:
            raise StoreError(f"{source or 'key'}: a store key is {KEY_LEN} bytes, got {len(secret)}")
        self.source = source
        self.key_id = blake3.blake3(b"revenant store key id v1", key=secret).digest(KEY_ID_LEN)
        self.id_key = _derive(secret, b"chunk id")
        self._chunk = AESGCM(_derive(secret, b"chunk seal"))
        self._manifest = AESGCM(_derive(secret, b"manifest seal"))

    @property
    def key_id_hex(self) -> str:
        return self.key_id.hex()

    def chunk_id(self, data: bytes | memoryview) -> str:
        return blake3.blake3(data, key=self.id_key, max_threads=1).hexdigest()

    def seal_chunk(self, digest: str, blob: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_LEN)
        aad = _CHUNK_AAD + self.key_id + digest.encode()
        return bytes([CHUNK_SEALED]) + self.key_id + nonce + self._chunk.encrypt(nonce, blob, aad)

    def open_chunk(self, digest: str, sealed: bytes) -> bytes:
        """The plain (compressed) chunk; ValueError if it is not sealed by this key or was altered."""
        head = 1 + KEY_ID_LEN + NONCE_LEN
        if len(sealed) < head + 16 or sealed[0] != CHUNK_SEALED:
            raise ValueError("not an encrypted chunk")
        if sealed[1 : 1 + KEY_ID_LEN] != self.key_id:
            raise ValueError(f"sealed with key {sealed[1 : 1 + KEY_ID_LEN].hex()}, not {self.key_id_hex}")
        nonce = sealed[1 + KEY_ID_LEN : head]
        try:
            return self._chunk.decrypt(nonce, sealed[head:], _CHUNK_AAD + self.key_id + digest.encode())
        except InvalidTag:
            raise ValueError("fails authentication (altered)") from None

    def seal_manifest(self, plain: bytes) -> bytes:
        header = MANIFEST_MAGIC + self.key_id_hex.encode() + b"\n"
        nonce = secrets.token_bytes(NONCE_LEN)
        return header + nonce + self._manifest.encrypt(nonce, plain, header)


def _derive(secret: bytes, purpose: bytes) -> bytes:
    return HKDF(hashes.SHA256(), KEY_LEN, salt=None, info=b"revenant store v1 " + purpose).derive(secret)


def sealed_manifest_key_id(blob: bytes) -> str | None:
    """The key id a sealed manifest names, None if blob is not a sealed manifest."""
    if not blob.startswith(MANIFEST_MAGIC):
        return None
    return blob[len(MANIFEST_MAGIC) : len(MANIFEST_MAGIC) + 2 * KEY_ID_LEN].decode("ascii", "replace")


class Keyring:
    """The keys of one store: keys[0] seals everything new, all of them open what they sealed."""

    def __init__(self, keys: list[StoreKey]) -> None:
        if not keys:
            raise StoreError("an encrypted store needs at least one key")
        self.keys = keys
        self.current = keys[0]
        self._by_id = {k.key_id_hex: k for k in keys}

    def get(self, key_id: str, what: str) -> StoreKey:
        key = self._by_id.get(key_id)
        if key is None:
            raise KeyMismatch(
                f"{what} is encrypted with key {key_id}, which is not configured (configured: "
                f"{', '.join(self._by_id)}); add its key file"
            )
        return key

    def open_manifest(self, blob: bytes, what: str) -> tuple[bytes, StoreKey]:
        """(plain manifest, the key that sealed it); ManifestCorrupt-worthy damage raises ValueError."""
        key_id = sealed_manifest_key_id(blob)
        if key_id is None:
            raise ValueError("not a sealed manifest")
        key = self.get(key_id, what)
        header_len = len(MANIFEST_MAGIC) + 2 * KEY_ID_LEN + 1
        header, body = blob[:header_len], blob[header_len:]
        if header[-1:] != b"\n" or len(body) < NONCE_LEN + 16:
            raise ValueError(f"truncated ({len(blob)} bytes)")
        try:
            return key._manifest.decrypt(body[:NONCE_LEN], body[NONCE_LEN:], header), key
        except InvalidTag:
            raise ValueError("fails authentication (damaged or altered)") from None

    @classmethod
    def from_files(cls, paths: list[str | Path]) -> Keyring:
        return cls([load_key_file(Path(p)) for p in paths])


def load_key_file(path: Path) -> StoreKey:
    """Read a key file: a regular file of this user's, readable by no group or other; 32 bytes raw, or
    64 hex digits, or base64 of 32 bytes (surrounding whitespace ignored for the text forms)."""
    return StoreKey(_parse_key(read_private_file(path, "key file", MAX_KEY_FILE), path), str(path))


def _parse_key(raw: bytes, path: Path) -> bytes:
    if len(raw) == KEY_LEN:
        return raw
    text = raw.strip()
    if len(text) == 2 * KEY_LEN:
        try:
            return binascii.unhexlify(text)
        except binascii.Error:
            pass
    try:
        key = base64.b64decode(text, validate=True)
        if len(key) == KEY_LEN:
            return key
    except binascii.Error:
        pass
    raise StoreError(
        f"key file {path}: expected {KEY_LEN} random bytes, {2 * KEY_LEN} hex digits or base64 of {KEY_LEN} "
        "bytes (make one with: head -c 32 /dev/urandom > FILE; chmod 600 FILE)"
    )
