"""Checkpoint manifests: what a checkpoint holds, serialized with a digest so damage is detected."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import blake3
import zstandard

from .errors import ManifestCorrupt

FORMAT = "revenant.checkpoint.v1"
_MAGIC = b"RVNMANIFEST1 "  # then 64 hex chars of BLAKE3(payload), '\n', zstd(JSON)
# Digest recorded for a chunk that is all zeros: never stored, restored as a hole.
ZERO = "zero"


@dataclass
class CheckpointInfo:
    key: str
    seq: int
    parent: int | None
    created: float
    files: int
    bytes_read: int
    bytes_uploaded: int
    chunks_total: int
    chunks_new: int
    metadata: dict[str, Any] = field(default_factory=dict)
    name: str = ""  # backend object name of the manifest (seq + writer nonce)

    @property
    def dedup_ratio(self) -> float:
        """Bytes read per byte uploaded (dedup and compression together); higher is better."""
        return self.bytes_read / self.bytes_uploaded if self.bytes_uploaded else float(self.bytes_read or 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "seq": self.seq,
            "parent": self.parent,
            "created": self.created,
            "files": self.files,
            "bytes_read": self.bytes_read,
            "bytes_uploaded": self.bytes_uploaded,
            "chunks_total": self.chunks_total,
            "chunks_new": self.chunks_new,
            "dedup_ratio": round(self.dedup_ratio, 3),
            "metadata": self.metadata,
        }


@dataclass
class Manifest:
    key: str
    seq: int
    parent: int | None
    created: float
    chunker: str
    metadata: dict[str, Any]
    # Each entry: {"path", "type": file|dir|symlink, "mode", "mtime", "uid", "gid",
    #              file: "size", "chunks": [[offset, length, digest], ...]; symlink: "target"}
    entries: list[dict[str, Any]]
    stats: dict[str, int]
    epoch: int | None = None  # the writer's owner epoch (Store.claim), None for puts without one
    sealed_with: Any = field(default=None, repr=False, compare=False)  # the StoreKey it was read with

    def info(self, name: str = "") -> CheckpointInfo:
        s = self.stats
        return CheckpointInfo(
            key=self.key,
            seq=self.seq,
            parent=self.parent,
            created=self.created,
            files=sum(1 for e in self.entries if e["type"] == "file"),
            bytes_read=s.get("bytes_read", 0),
            bytes_uploaded=s.get("bytes_uploaded", 0),
            chunks_total=s.get("chunks_total", 0),
            chunks_new=s.get("chunks_new", 0),
            metadata=self.metadata,
            name=name,
        )

    def chunk_digests(self) -> set[str]:
        return {c[2] for e in self.entries if e["type"] == "file" for c in e["chunks"] if c[2] != ZERO}

    def encode(self) -> bytes:
        doc = {
            "format": FORMAT,
            "key": self.key,
            "seq": self.seq,
            "parent": self.parent,
            "created": self.created,
            "chunker": self.chunker,
            "metadata": self.metadata,
            "stats": self.stats,
            "entries": self.entries,
        }
        if self.epoch is not None:
            doc["epoch"] = self.epoch
        payload = zstandard.ZstdCompressor(level=3).compress(json.dumps(doc, separators=(",", ":")).encode())
        return _MAGIC + blake3.blake3(payload).hexdigest().encode() + b"\n" + payload

    @classmethod
    def decode(cls, blob: bytes, what: str = "manifest") -> Manifest:
        head = len(_MAGIC) + 65
        if len(blob) < head or not blob.startswith(_MAGIC) or blob[head - 1 : head] != b"\n":
            raise ManifestCorrupt(f"{what} is truncated or not a revenant manifest ({len(blob)} bytes)")
        payload = blob[head:]
        if blake3.blake3(payload).hexdigest().encode() != blob[len(_MAGIC) : head - 1]:
            raise ManifestCorrupt(f"{what} is damaged: digest mismatch ({len(blob)} bytes, truncated?)")
        try:
            doc = json.loads(zstandard.ZstdDecompressor().decompress(payload, max_output_size=1 << 31))
        except (zstandard.ZstdError, ValueError) as e:
            raise ManifestCorrupt(f"{what} cannot be decoded: {e}") from e
        if doc.get("format") != FORMAT:
            raise ManifestCorrupt(f"{what} has unknown format {doc.get('format')!r}")
        return cls(
            key=doc["key"],
            seq=doc["seq"],
            parent=doc["parent"],
            created=doc["created"],
            chunker=doc["chunker"],
            metadata=doc["metadata"],
            entries=doc["entries"],
            stats=doc["stats"],
            epoch=doc.get("epoch"),
        )


def looks_like_manifest(blob: bytes) -> bool:
    """Whether blob starts as a plaintext revenant manifest does (damaged or not)."""
    return blob.startswith(_MAGIC)


def manifest_name(seq: int, nonce: str) -> str:
    return f"{seq:010d}-{nonce}"


def parse_manifest_name(name: str) -> tuple[int, str] | None:
    seq, sep, nonce = name.partition("-")
    if not sep or not seq.isdigit() or not nonce.isalnum():
        return None
    return int(seq), nonce
