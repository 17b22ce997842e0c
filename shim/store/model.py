"""Checkpoint manifests: what a checkpoint holds, serialized with a digest so damage is detected."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import blake3
import zstandard

from .errors import ManifestCorrupt, ManifestTooNew
from .limits import (
    MAX_CHUNK_LEN,
    MAX_CHUNK_REFS,
    MAX_ENTRIES,
    MAX_FILE_SIZE,
    MAX_ID,
    MAX_MANIFEST_BYTES,
    MAX_PAGE_TABLE_BYTES,
    NAME_MAX,
    PATH_MAX,
    bounded_zstd_decode,
)

FORMAT = "revenant.checkpoint.v1"
# v2 adds page-granular dedup (shim.store.pages): file entries flagged "pages", slice references
# [offset, length, digest, offset_in_chunk, chunk_length] and a "page_table". Written only when a put
# uses them, so a v1 reader refuses such a manifest by its format instead of misreading it.
FORMAT_V2 = "revenant.checkpoint.v2"
PAGE = 4096
PAGE_HASH_LEN = 16
PAGE_HASH = "blake3-128"  # the page table's hash: BLAKE3 of each 4 KiB page, first 16 bytes
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
    epoch: int | None = None  # the writer's owner epoch (Store.claim); None for a put without one

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
            **({"epoch": self.epoch} if self.epoch is not None else {}),
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
    # v2: a file's reference may be a slice [offset, length, digest, offset_in_chunk, chunk_length], and
    # a page-image file has "pages": true (its pages' hashes are in page_table).
    entries: list[dict[str, Any]]
    stats: dict[str, int]
    epoch: int | None = None  # the writer's owner epoch (Store.claim), None for puts without one
    # {"hash": PAGE_HASH, "size": bytes, "chunks": [[offset, length, digest], ...]}: v2 only
    page_table: dict[str, Any] | None = None
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
            epoch=self.epoch,
        )

    def file_digests(self) -> set[str]:
        """The chunks its files reference (whole or sliced): what a restore reads."""
        return {c[2] for e in self.entries if e["type"] == "file" for c in e["chunks"] if c[2] != ZERO}

    def chunk_digests(self) -> set[str]:
        """Every chunk this checkpoint needs: its files' and its page table's (read by the next put only)."""
        digests = self.file_digests()
        if self.page_table is not None:
            digests.update(c[2] for c in self.page_table["chunks"] if c[2] != ZERO)
        return digests

    def page_files(self) -> list[dict[str, Any]]:
        """The page-image file entries, in the order of their hashes in the page table."""
        return [e for e in self.entries if e["type"] == "file" and e.get("pages")]

    def encode(self) -> bytes:
        raw = json.dumps(self._doc(), separators=(",", ":")).encode()
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ManifestCorrupt(
                f"manifest of {self.key!r} would be {len(raw)} bytes, over the {MAX_MANIFEST_BYTES}-byte limit "
                "(too many files or chunks: use a larger chunk size)"
            )
        payload = zstandard.ZstdCompressor(level=3).compress(raw)
        return _MAGIC + blake3.blake3(payload).hexdigest().encode() + b"\n" + payload

    @classmethod
    def decode(cls, blob: bytes, what: str = "manifest") -> Manifest:
        """Check the framing and digest, decode within MAX_MANIFEST_BYTES, then validate the whole schema.

        A manifest's digest only proves it was not damaged, not that its writer was honest: everything
        in it is checked here, so callers can index entries without further checks.
        """
        head = len(_MAGIC) + 65
        if len(blob) < head or not blob.startswith(_MAGIC) or blob[head - 1 : head] != b"\n":
            raise ManifestCorrupt(f"{what} is truncated or not a revenant manifest ({len(blob)} bytes)")
        if len(blob) > MAX_MANIFEST_BYTES + head:
            raise ManifestCorrupt(f"{what} is {len(blob)} bytes, over the {MAX_MANIFEST_BYTES}-byte limit")
        payload = blob[head:]
        if blake3.blake3(payload).hexdigest().encode() != blob[len(_MAGIC) : head - 1]:
            raise ManifestCorrupt(f"{what} is damaged: digest mismatch ({len(blob)} bytes, truncated?)")
        try:
            raw = bounded_zstd_decode(payload, MAX_MANIFEST_BYTES, window_max=1 << 24)
            doc = json.loads(raw)
        except (zstandard.ZstdError, ValueError, RecursionError) as e:
            raise ManifestCorrupt(f"{what} cannot be decoded: {e}") from e
        return validate_manifest_doc(doc, what)

    def check(self, what: str = "manifest") -> None:
        """Validate this (freshly built) manifest exactly as a reader will: put never writes one get refuses."""
        validate_manifest_doc(self._doc(), what)

    def _doc(self) -> dict[str, Any]:
        return {
            "format": FORMAT if self.page_table is None else FORMAT_V2,
            "key": self.key,
            "seq": self.seq,
            "parent": self.parent,
            "created": self.created,
            "chunker": self.chunker,
            "metadata": self.metadata,
            "stats": self.stats,
            "entries": self.entries,
            **({"epoch": self.epoch} if self.epoch is not None else {}),
            **({"page_table": self.page_table} if self.page_table is not None else {}),
        }


def page_count(size: int) -> int:
    return -(-size // PAGE)


_HEX64 = re.compile(r"[0-9a-f]{64}")
ENTRY_TYPES = ("file", "dir", "symlink")


def _int(v: Any, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi


# Seconds either side of 1970 that every time_t and utime() accept (about 34,000 years).
MAX_MTIME = 2**40


def _number(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def check_entry_path(path: Any) -> list[str]:
    """Components of a manifest entry path: relative, normalised, no '..', no NUL, sane lengths.

    Stricter than the writable-layer applier: a manifest is written by scan_tree, which only ever emits
    `a/b/c` forms, so anything else ('.', '', '//', a trailing '/') is damage or an attack.
    """
    if type(path) is not str or not path:
        raise ValueError("path must be a non-empty string")
    if "\0" in path:
        raise ValueError("NUL in path")
    if len(path.encode("utf-8", "surrogatepass")) > PATH_MAX:
        raise ValueError(f"path longer than {PATH_MAX} bytes")
    if path.startswith("/"):
        raise ValueError("absolute path")
    parts = path.split("/")
    for p in parts:
        if p in ("", ".", ".."):
            raise ValueError(f"component {p!r} not allowed")
        if len(p.encode("utf-8", "surrogatepass")) > NAME_MAX:
            raise ValueError(f"component longer than {NAME_MAX} bytes")
    return parts


def check_symlink_target(path: str, target: Any) -> None:
    """A symlink must stay inside the restored tree: no absolute target, no climbing out.

    Restore never follows links, but whoever reads the restored dir (CRIU, the layer applier) opens
    files by name: a link to a host file would feed its contents into the restored container.
    """
    if type(target) is not str or not target or "\0" in target:
        raise ValueError("symlink target must be a non-empty string without NUL")
    if len(target.encode("utf-8", "surrogatepass")) > PATH_MAX:
        raise ValueError(f"symlink target longer than {PATH_MAX} bytes")
    if target.startswith("/"):
        raise ValueError(f"symlink target {target!r} is absolute")
    depth = path.count("/")  # directories the link sits below
    for p in target.split("/"):
        if p == "..":
            depth -= 1
            if depth < 0:
                raise ValueError(f"symlink target {target!r} points outside the checkpoint")
        elif p not in ("", "."):
            depth += 1


def _check_entry(e: Any, dirs: set[str], seen: set[str], v2: dict[str, int] | None = None) -> int:
    """Validate one entry; returns its number of chunk references.

    v2: None for a v1 manifest; else digest -> chunk length seen so far in this manifest (one chunk has
    one length), and slice references, the "pages" flag and ordered, non-overlapping references apply."""
    if type(e) is not dict:
        raise ValueError("entry is not an object")
    path: Any = e.get("path")  # a str once check_entry_path passed
    parts = check_entry_path(path)
    if path in seen:
        raise ValueError("duplicate path")
    seen.add(path)
    parent = "/".join(parts[:-1])
    # scan_tree lists a directory before anything in it: a parent must be an earlier `dir` entry,
    # so no entry can sit below a symlink or a file.
    if parent and parent not in dirs:
        raise ValueError(f"parent {parent!r} is not an earlier directory entry")
    kind = e.get("type")
    if kind not in ENTRY_TYPES:
        raise ValueError(f"unknown entry type {kind!r}")
    if not _int(e.get("mode"), 0, 0o7777):
        raise ValueError(f"bad mode {e.get('mode')!r}")
    if not _number(e.get("mtime")) or not -MAX_MTIME <= e["mtime"] <= MAX_MTIME:
        raise ValueError(f"bad mtime {e.get('mtime')!r}")
    for k in ("uid", "gid"):
        if not _int(e.get(k), 0, MAX_ID):
            raise ValueError(f"bad {k} {e.get(k)!r}")
    if kind == "dir":
        dirs.add(path)
        return 0
    if kind == "symlink":
        check_symlink_target(path, e.get("target"))
        return 0
    size: Any = e.get("size")
    if not _int(size, 0, MAX_FILE_SIZE):
        raise ValueError(f"bad size {size!r}")
    if "pages" in e and (v2 is None or e["pages"] is not True):
        raise ValueError(f"bad pages flag {e['pages']!r:.20}")
    chunks = e.get("chunks")
    if type(chunks) is not list:
        raise ValueError("chunks is not a list")
    check_refs(chunks, size, v2)
    return len(chunks)


def check_refs(chunks: list[Any], size: int, v2: dict[str, int] | None) -> None:
    """A file's (or the page table's) references: in bounds; in v2 also slices, in order, not overlapping."""
    end = 0
    for c in chunks:
        if type(c) is not list or not (len(c) == 3 or (v2 is not None and len(c) == 5)):
            raise ValueError(f"bad chunk reference {c!r:.80}")
        off, length, digest = c[:3]
        if not _int(off, 0, size) or not _int(length, 1, MAX_CHUNK_LEN) or off + length > size:
            raise ValueError(f"chunk [{off!r:.20}, {length!r:.20}] outside the file's {size} bytes")
        if digest != ZERO and not (type(digest) is str and _HEX64.fullmatch(digest)):
            raise ValueError(f"bad chunk digest {digest!r:.80}")
        if v2 is None:
            continue
        if off < end:
            raise ValueError(f"chunk at {off} overlaps or precedes the one before (ending at {end})")
        end = off + length
        if digest == ZERO:
            if len(c) != 3:
                raise ValueError("a slice of the zero chunk")
            continue
        coff, clen = (c[3], c[4]) if len(c) == 5 else (0, length)
        if not _int(clen, 1, MAX_CHUNK_LEN) or not _int(coff, 0, clen) or coff + length > clen:
            raise ValueError(f"slice [{coff!r:.20}, +{length}] outside its {clen!r:.20}-byte chunk")
        if v2.setdefault(digest, clen) != clen:
            raise ValueError(f"chunk {digest} referenced as {clen} and as {v2[digest]} bytes long")


def _check_page_table(doc: dict[str, Any], entries: list[Any], v2: dict[str, int]) -> None:
    table = doc.get("page_table")
    if type(table) is not dict or table.get("hash") != PAGE_HASH:
        raise ValueError(f"page_table {str(table)[:80]!r} is not a {PAGE_HASH} table")
    pages = sum(page_count(e["size"]) for e in entries if e["type"] == "file" and e.get("pages"))
    size: Any = table.get("size")
    if size != pages * PAGE_HASH_LEN or not _int(size, 0, MAX_PAGE_TABLE_BYTES):
        raise ValueError(f"page_table size {size!r:.20} for {pages} pages (at most {MAX_PAGE_TABLE_BYTES} bytes)")
    chunks = table.get("chunks")
    if type(chunks) is not list or len(chunks) > MAX_CHUNK_REFS:
        raise ValueError(f"page_table chunks is not a list of at most {MAX_CHUNK_REFS}")
    check_refs(chunks, size, v2)
    if any(len(c) != 3 or c[2] == ZERO for c in chunks) or sum(c[1] for c in chunks) != size:
        raise ValueError("page_table chunks do not cover it with whole chunks")


def validate_manifest_doc(doc: Any, what: str = "manifest") -> Manifest:
    """The one schema check every decoded manifest passes: types, ranges, path rules and counts."""
    if type(doc) is not dict:
        raise ManifestCorrupt(f"{what} is not a JSON object")
    if doc.get("format") not in (FORMAT, FORMAT_V2):
        newer = re.fullmatch(r"revenant\.checkpoint\.v([0-9]{1,6})", str(doc.get("format")))
        if newer and int(newer.group(1)) > 2:
            raise ManifestTooNew(f"{what} has format {doc['format']!r}, newer than this revenant reads: upgrade it")
        raise ManifestCorrupt(f"{what} has unknown format {str(doc.get('format'))[:80]!r}")
    problems = []
    key: Any = doc.get("key")
    if type(key) is not str or not 1 <= len(key) <= 1024 or "\0" in key:
        problems.append("key")
    if not _int(doc.get("seq"), 0, 2**63 - 1):
        problems.append("seq")
    if doc.get("parent") is not None and not _int(doc.get("parent"), 0, 2**63 - 1):
        problems.append("parent")
    if not _number(doc.get("created")):
        problems.append("created")
    if type(doc.get("chunker")) is not str or len(doc["chunker"]) > 64:
        problems.append("chunker")
    if type(doc.get("metadata")) is not dict:
        problems.append("metadata")
    stats: Any = doc.get("stats")
    if type(stats) is not dict or not all(type(k) is str and _int(v, 0, 2**63 - 1) for k, v in stats.items()):
        problems.append("stats")
    entries: Any = doc.get("entries")
    if type(entries) is not list or len(entries) > MAX_ENTRIES:
        problems.append("entries")
    if doc.get("epoch") is not None and not _int(doc.get("epoch"), 1, 2**63 - 1):
        problems.append("epoch")
    if problems:
        raise ManifestCorrupt(f"{what} has missing or invalid fields: {', '.join(problems)}")
    dirs: set[str] = set()
    seen: set[str] = set()
    refs = 0
    v2: dict[str, int] | None = {} if doc["format"] == FORMAT_V2 else None
    for i, e in enumerate(entries):
        try:
            refs += _check_entry(e, dirs, seen, v2)
        except ValueError as err:
            path = e.get("path") if type(e) is dict else None
            raise ManifestCorrupt(f"{what}: entry {i} ({str(path)[:120]!r}): {err}") from None
        if refs > MAX_CHUNK_REFS:
            raise ManifestCorrupt(f"{what} references more than {MAX_CHUNK_REFS} chunks")
    if v2 is None:
        if "page_table" in doc:
            raise ManifestCorrupt(f"{what}: a page_table in a {FORMAT} manifest")
    else:
        try:
            _check_page_table(doc, entries, v2)
        except ValueError as err:
            raise ManifestCorrupt(f"{what}: {err}") from None
    return Manifest(
        key=key,
        seq=doc["seq"],
        parent=doc["parent"],
        created=doc["created"],
        chunker=doc["chunker"],
        metadata=doc["metadata"],
        entries=entries,
        stats=stats,
        epoch=doc.get("epoch"),
        page_table=doc.get("page_table"),
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
