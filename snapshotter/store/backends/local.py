"""file:// backend: a directory tree; atomic renames, fsync where durability matters.

Layout: chunks/<d[:2]>/<digest>, manifests/<encoded key>/<seq>-<nonce>, locks/<name>.
Chunks are written without fsync each; Backend.sync() (one syncfs) makes them durable before the
manifest that references them is written and fsynced.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from ..errors import StoreError
from ..keys import decode_key, encode_key
from .base import Backend, NotFound

_libc = ctypes.CDLL(None, use_errno=True)


class LocalBackend(Backend):
    def __init__(self, root: Path, url: str = "") -> None:
        self.root = root
        self.url = url or f"file://{root}"
        for sub in ("chunks", "manifests", "locks", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def _chunk_path(self, digest: str) -> Path:
        return self.root / "chunks" / digest[:2] / digest

    def _write_atomic(self, path: Path, data: bytes, durable: bool) -> None:
        tmp = self.root / "tmp" / f"{path.name}.{secrets.token_hex(6)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.rename(tmp, path)
            except FileNotFoundError:
                path.parent.mkdir(parents=True, exist_ok=True)
                os.rename(tmp, path)
            if durable:
                _fsync_dir(path.parent)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreError(f"{self.url}: no space left writing {path.name}: {e}") from e
            raise StoreError(f"{self.url}: cannot write {path}: {e}") from e

    def sync(self) -> None:
        """Flush every chunk written so far (one syncfs for the whole store filesystem)."""
        fd = os.open(self.root, os.O_RDONLY)
        try:
            if _libc.syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise StoreError(f"{self.url}: syncfs failed: {os.strerror(err)}")
        finally:
            os.close(fd)

    # chunks
    def has_chunk(self, digest: str) -> bool:
        return self._chunk_path(digest).exists()

    def put_chunk(self, digest: str, data: bytes) -> None:
        self._write_atomic(self._chunk_path(digest), data, durable=False)

    def get_chunk(self, digest: str) -> bytes:
        try:
            return self._chunk_path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"chunk {digest} not found") from None

    def delete_chunk(self, digest: str) -> None:
        self._chunk_path(digest).unlink(missing_ok=True)

    def list_chunks(self) -> Iterator[tuple[str, float]]:
        base = self.root / "chunks"
        for sub in sorted(os.listdir(base)):
            with os.scandir(base / sub) as it:
                for ent in it:
                    try:
                        yield ent.name, ent.stat().st_mtime
                    except FileNotFoundError:
                        continue

    # manifests
    def _manifest_path(self, key: str, name: str) -> Path:
        return self.root / "manifests" / encode_key(key) / name

    def put_manifest(self, key: str, name: str, data: bytes, chunks: set[str]) -> None:
        self.sync()  # chunks durable before anything references them
        path = self._manifest_path(key, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_atomic(path, data, durable=True)

    def get_manifest(self, key: str, name: str) -> bytes:
        try:
            return self._manifest_path(key, name).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"manifest {key} {name} not found") from None

    def list_manifests(self, key: str | None) -> list[tuple[str, str]]:
        base = self.root / "manifests"
        dirs = [encode_key(key)] if key is not None else sorted(os.listdir(base))
        out = []
        for d in dirs:
            try:
                names = os.listdir(base / d)
            except FileNotFoundError:
                continue
            out += [(decode_key(d), n) for n in sorted(names)]
        return out

    def delete_manifest(self, key: str, name: str) -> None:
        path = self._manifest_path(key, name)
        path.unlink(missing_ok=True)
        _fsync_dir(path.parent)

    # locks
    def put_lock(self, name: str, data: bytes) -> None:
        self._write_atomic(self.root / "locks" / name, data, durable=True)

    def list_locks(self) -> list[tuple[str, bytes]]:
        out = []
        for p in sorted((self.root / "locks").iterdir()):
            try:
                out.append((p.name, p.read_bytes()))
            except FileNotFoundError:
                continue
        return out

    def delete_lock(self, name: str) -> None:
        (self.root / "locks" / name).unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
