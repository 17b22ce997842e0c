"""file:// backend: a directory tree; atomic renames, fsync where durability matters.

Layout: packs/<id>.pack + packs/<id>.idx, manifests/<encoded key>/<seq>-<nonce>, locks/<name>.

Chunks are appended to pack files of ~16 MiB (one file per chunk cost ~1 ms each to create on a busy
ext4, which dominated put time); a pack's index (digest, offset, length per chunk) is written atomically
once the pack is complete and fsynced, and only indexed chunks exist for readers. A crash leaves a pack
without an index: invisible, removed by gc. `?packs=0` stores one file per chunk under
chunks/<d[:2]>/<digest> instead (made durable by one syncfs before the manifest); both are always read.

Everything the store writes is 0600 and every directory 0700, whatever the umask: checkpoints hold
process memory. A key too long for one file name gets a hashed directory name (keys.key_dir_name) and
the key itself in a `.key` file beside its manifests. Stray names (under manifests/, locks/, chunks/,
in a pack index) are skipped with a warning, never trusted.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from shim import libc

from ...faults import crash_point
from ..errors import StoreError
from ..keys import decode_key, is_hashed_dir_name, key_dir_name, validate_key
from ..limits import MAX_CHUNK_OBJECT, MAX_LOCK_OBJECT, MAX_MANIFEST_OBJECT
from .base import Backend, LockState, NotFound, TooLarge

log = logging.getLogger(__name__)


PACK_TARGET = 16 << 20
_IDX_ENTRY = struct.Struct("<32sQI")  # digest, offset, length
KEY_FILE = ".key"  # the full key, in a directory whose name is hashed
FILE_MODE = 0o600
DIR_MODE = 0o700


class LocalBackend(Backend):
    def __init__(self, root: Path, url: str = "", packs: bool = True) -> None:
        self.root = root
        self.url = url or f"file://{root}"
        self.packs = packs
        root.mkdir(DIR_MODE, parents=True, exist_ok=True)
        _tighten(root)
        for sub in ("chunks", "manifests", "locks", "tmp", "packs"):
            (root / sub).mkdir(DIR_MODE, exist_ok=True)
            _tighten(root / sub)
        self._lock = threading.Lock()
        self._index: dict[str, tuple[str, int, int]] = {}  # digest -> (pack id, offset, length)
        self._loaded: set[str] = set()  # pack ids whose index is in _index
        self._pack_mtime: dict[str, float] = {}
        self._cur: tuple[str, int] | None = None  # (pack id, fd) being written: the only pack fd held open
        self._cur_size = 0
        self._cur_entries: list[tuple[str, int, int]] = []
        # Written and closed, not yet fsynced and indexed (fsync at seal time reopens the file: an fd per
        # full pack kept open until a put succeeded ran out of fds after ~16 GiB of failing puts).
        self._full: list[tuple[str, list[tuple[str, int, int]]]] = []
        self._doomed: set[str] = set()  # chunks gc deleted; packs rewritten in finish_gc

    # ------------------------------------------------------------------ packs
    def _pack_path(self, pack: str, ext: str) -> Path:
        return self.root / "packs" / f"{pack}.{ext}"

    def _reload(self) -> None:
        """Read the indexes of packs this process has not seen yet (other writers, gc rewrites)."""
        try:
            names = os.listdir(self.root / "packs")
        except FileNotFoundError:
            return
        present = {n[:-4] for n in names if n.endswith(".idx")}
        for pack in present - self._loaded:
            try:
                st = self._pack_path(pack, "idx").stat()
                if not stat.S_ISREG(st.st_mode) or st.st_size > 64 << 20:
                    log.warning("%s: skipping pack index %s: not a plausible index file", self.url, pack)
                    continue
                raw = self._pack_path(pack, "idx").read_bytes()
                mtime = st.st_mtime
            except FileNotFoundError:
                continue
            except OSError as e:
                log.warning("%s: skipping unreadable pack index %s: %s", self.url, pack, e)
                continue
            with self._lock:
                for off in range(0, len(raw) - len(raw) % _IDX_ENTRY.size, _IDX_ENTRY.size):
                    d, o, n = _IDX_ENTRY.unpack_from(raw, off)
                    if n > MAX_CHUNK_OBJECT:  # a forged index must not make get_chunk allocate n bytes
                        log.warning("%s: pack %s lists a %d-byte chunk; ignoring it", self.url, pack, n)
                        continue
                    self._index[d.hex()] = (pack, o, n)
                self._loaded.add(pack)
                self._pack_mtime[pack] = mtime
        gone = self._loaded - present
        if gone:
            with self._lock:
                self._loaded -= gone
                for d in [d for d, (p, _o, _n) in self._index.items() if p in gone]:
                    del self._index[d]

    def _append(self, digest: str, data: bytes) -> None:
        full_fd = -1
        with self._lock:
            if self._cur is None:
                pack = secrets.token_hex(8)
                fd = os.open(
                    self._pack_path(pack, "pack"), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE
                )
                self._cur, self._cur_size, self._cur_entries = (pack, fd), 0, []
            pack, fd = self._cur
            off = self._cur_size
            try:
                view = memoryview(data)
                pos = off
                while view:
                    n = os.pwrite(fd, view, pos)
                    view, pos = view[n:], pos + n
            except OSError as e:
                self._abandon_current()
                raise self._os_error(e, f"pack {pack}") from e
            self._cur_size += len(data)
            self._cur_entries.append((digest, off, len(data)))
            crash_point("store.pack.after-append")
            if self._cur_size >= PACK_TARGET:
                self._full.append((pack, self._cur_entries))
                self._cur = None
                full_fd = fd
        if full_fd >= 0:
            # Start writing the full pack back now, outside the lock: the fsync at seal time then waits
            # for little more than the last pack instead of every pack of the put (~2 s per GiB here).
            try:
                libc.start_writeback(full_fd, 0, 0)
            except OSError as e:
                log.debug("%s: sync_file_range on a full pack: %s", self.url, e)
            finally:
                os.close(full_fd)

    def _abandon_current(self) -> None:
        if self._cur is not None:
            pack, fd = self._cur
            os.close(fd)
            self._pack_path(pack, "pack").unlink(missing_ok=True)
            self._cur = None

    def _os_error(self, e: OSError, what: str) -> StoreError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return StoreError(f"{self.url}: no space left writing {what}: {e}")
        return StoreError(f"{self.url}: cannot write {what}: {e}")

    def _seal_packs(self) -> None:
        """fsync every pack written so far, then publish its index (atomically, durably)."""
        with self._lock:
            if self._cur is not None and self._cur_entries:
                self._full.append((self._cur[0], self._cur_entries))
                os.close(self._cur[1])
                self._cur = None
            full, self._full = self._full, []
        for i, (pack, entries) in enumerate(full):
            try:
                fd = os.open(self._pack_path(pack, "pack"), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)  # flushes the file's data written through the (closed) writer fd
                finally:
                    os.close(fd)
                crash_point("store.pack.after-fsync")
                idx = b"".join(_IDX_ENTRY.pack(bytes.fromhex(d), o, n) for d, o, n in entries)
                self._write_atomic(self._pack_path(pack, "idx"), idx, durable=True, point="index")
                crash_point("store.pack.after-index")
            except (OSError, StoreError) as e:
                for p, _e in full[i:]:
                    self._pack_path(p, "pack").unlink(missing_ok=True)
                if isinstance(e, StoreError):
                    raise
                raise self._os_error(e, f"pack {pack}") from e
            with self._lock:
                for d, o, n in entries:
                    self._index[d] = (pack, o, n)
                self._loaded.add(pack)
                self._pack_mtime[pack] = time.time()

    def _chunk_path(self, digest: str) -> Path:
        return self.root / "chunks" / digest[:2] / digest

    def _write_atomic(self, path: Path, data: bytes, durable: bool, point: str = "") -> None:
        """Write data to a temporary file, then rename it to path; point names the crash points around
        the rename (store.<point>.before-rename / .after-rename)."""
        tmp = self.root / "tmp" / f"{path.name}.{secrets.token_hex(6)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if point:
                crash_point(f"store.{point}.before-rename")
            try:
                os.rename(tmp, path)
            except FileNotFoundError:
                path.parent.mkdir(DIR_MODE, parents=True, exist_ok=True)
                os.rename(tmp, path)
            if durable:
                _fsync_dir(path.parent)
            if point:
                crash_point(f"store.{point}.after-rename")
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreError(f"{self.url}: no space left writing {path.name}: {e}") from e
            raise StoreError(f"{self.url}: cannot write {path}: {e}") from e

    def sync(self) -> None:
        """Make every chunk written so far durable: seal the packs, one syncfs for loose chunk files."""
        self._seal_packs()
        if self.packs:
            return
        try:
            libc.syncfs(self.root)
        except OSError as e:
            raise StoreError(f"{self.url}: syncfs failed: {e.strerror}") from e

    # chunks
    def has_chunk(self, digest: str) -> bool:
        if digest in self._index or self._chunk_path(digest).exists():
            return True
        self._reload()  # packed by another process (or before this one read the indexes)
        return digest in self._index

    def put_chunk(self, digest: str, data: bytes) -> None:
        if self.packs:
            self._append(digest, data)
        else:
            self._write_atomic(self._chunk_path(digest), data, durable=False)

    def get_chunk(self, digest: str) -> bytes:
        for attempt in range(2):
            loc = self._index.get(digest)
            if loc is not None:
                pack, off, n = loc
                try:
                    with open(self._pack_path(pack, "pack"), "rb") as f:
                        return os.pread(f.fileno(), n, off)
                except FileNotFoundError:
                    pass  # rewritten by gc in another process: reload the indexes
            try:
                return _read_bounded(self._chunk_path(digest), MAX_CHUNK_OBJECT, f"chunk {digest}")
            except FileNotFoundError:
                pass
            if attempt == 0:
                self._reload()
        raise NotFound(f"chunk {digest} not found")

    def delete_chunk(self, digest: str) -> None:
        self._chunk_path(digest).unlink(missing_ok=True)
        if digest in self._index:
            self._doomed.add(digest)

    def list_chunks(self) -> Iterator[tuple[str, float]]:
        self._reload()
        with self._lock:
            packed = [(d, self._pack_mtime.get(p, 0.0)) for d, (p, _o, _n) in self._index.items()]
        yield from packed
        base = self.root / "chunks"
        for sub in sorted(os.listdir(base)):
            try:
                it = os.scandir(base / sub)
            except NotADirectoryError:
                log.warning("%s: skipping stray file chunks/%s", self.url, sub)
                continue
            with it:
                for ent in it:
                    try:
                        yield ent.name, ent.stat().st_mtime
                    except FileNotFoundError:
                        continue

    def finish_gc(self, grace_seconds: float, proceed: Callable[[], bool] = lambda: True) -> None:
        """Rewrite packs that hold deleted chunks; drop packs a crashed writer never indexed.

        Until its pack is rewritten a deleted chunk stays readable: stopping (proceed() False) loses
        nothing, the next gc finds the chunk unreferenced again."""
        doomed, self._doomed = self._doomed, set()
        by_pack: dict[str, list[tuple[str, int, int]]] = {}
        with self._lock:
            for d, (p, o, n) in self._index.items():
                by_pack.setdefault(p, []).append((d, o, n))
        for pack, entries in by_pack.items():
            if not any(d in doomed for d, _o, _n in entries):
                continue
            live = [(d, o, n) for d, o, n in entries if d not in doomed]
            if live:
                with open(self._pack_path(pack, "pack"), "rb") as f:
                    for d, o, n in live:
                        self._append(d, os.pread(f.fileno(), n, o))
                crash_point("store.gc.mid-rewrite")
                self._seal_packs()  # the live chunks are durable in a new pack before the old one goes
            crash_point("store.gc.before-unlink")
            if not proceed():
                return
            self._pack_path(pack, "idx").unlink(missing_ok=True)
            _fsync_dir(self.root / "packs")
            crash_point("store.gc.after-idx-unlink")
            self._pack_path(pack, "pack").unlink(missing_ok=True)
            with self._lock:
                self._loaded.discard(pack)
                for d, _o, _n in entries:
                    if self._index.get(d, (None,))[0] == pack:
                        del self._index[d]
        cutoff = time.time() - grace_seconds
        for name in os.listdir(self.root / "packs"):
            pack, _, ext = name.partition(".")
            path = self.root / "packs" / name
            if ext == "pack" and not self._pack_path(pack, "idx").exists():
                try:
                    if path.stat().st_mtime < cutoff and proceed():
                        path.unlink()
                except FileNotFoundError:
                    continue

    def close(self) -> None:
        """Drop packs written but never sealed (never indexed, so invisible: a failed put's chunks) and
        release the current pack's fd."""
        with self._lock:
            unsealed = [p for p, _e in self._full]
            self._full = []
            self._abandon_current()
        for pack in unsealed:
            self._pack_path(pack, "pack").unlink(missing_ok=True)

    # manifests
    def _manifest_path(self, key: str, name: str) -> Path:
        return self.root / "manifests" / key_dir_name(key) / name

    def put_manifest(self, key: str, name: str, data: bytes, chunks: set[str]) -> None:
        self.sync()  # chunks durable before anything references them
        path = self._manifest_path(key, name)
        path.parent.mkdir(DIR_MODE, parents=True, exist_ok=True)
        if is_hashed_dir_name(path.parent.name) and not (path.parent / KEY_FILE).exists():
            self._write_atomic(path.parent / KEY_FILE, key.encode(), durable=True)
        self._write_atomic(path, data, durable=True, point="manifest")

    def get_manifest(self, key: str, name: str) -> bytes:
        try:
            return _read_bounded(self._manifest_path(key, name), MAX_MANIFEST_OBJECT, f"manifest {key} {name}")
        except FileNotFoundError:
            raise NotFound(f"manifest {key} {name} not found") from None

    def _dir_key(self, d: str) -> str | None:
        """The key a directory under manifests/ holds, or None (with a warning) for a stray name."""
        try:
            if not is_hashed_dir_name(d):
                return decode_key(d)
            key = _read_bounded(self.root / "manifests" / d / KEY_FILE, 4 * 1024 * 4, "key file").decode()
            validate_key(key)
            if key_dir_name(key) == d:
                return key
        except (OSError, ValueError, StoreError) as e:
            log.warning("%s: skipping stray manifests/%s: %s", self.url, d[:80], e)
            return None
        log.warning("%s: skipping manifests/%s: its key file names another key", self.url, d[:80])
        return None

    def list_manifests(self, key: str | None) -> list[tuple[str, str]]:
        base = self.root / "manifests"
        if key is not None:
            pairs = [(key, key_dir_name(key))]
        else:
            pairs = [(k, d) for d in sorted(os.listdir(base)) if (k := self._dir_key(d)) is not None]
        out = []
        for k, d in pairs:
            try:
                names = os.listdir(base / d)
            except (FileNotFoundError, NotADirectoryError):
                continue
            out += [(k, n) for n in sorted(names) if n != KEY_FILE]
        return out

    def delete_manifest(self, key: str, name: str) -> None:
        path = self._manifest_path(key, name)
        path.unlink(missing_ok=True)
        _fsync_dir(path.parent)

    # owner epochs
    def _epoch_dir(self, key: str) -> Path:
        return self.root / "epochs" / key_dir_name(key)

    def create_epoch(self, key: str, n: int, data: bytes) -> bool:
        """A fully written, fsynced temporary file hard-linked to the epoch's name: link() fails if the
        name exists, so exactly one claimer creates each epoch and no one sees a partial one."""
        path = self._epoch_dir(key) / f"{n:010d}"
        (self.root / "epochs").mkdir(DIR_MODE, exist_ok=True)
        path.parent.mkdir(DIR_MODE, exist_ok=True)
        tmp = self.root / "tmp" / f"epoch.{secrets.token_hex(6)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            _fsync_dir(path.parent)
            return True
        except OSError as e:
            raise self._os_error(e, f"epoch {n} of {key!r}") from e
        finally:
            tmp.unlink(missing_ok=True)

    def list_epochs(self, key: str) -> list[int]:
        try:
            names = os.listdir(self._epoch_dir(key))
        except FileNotFoundError:
            return []
        return [int(n) for n in names if n.isdigit()]

    # locks
    def put_lock(self, name: str, data: bytes) -> None:
        self._write_atomic(self.root / "locks" / name, data, durable=True)

    def list_locks(self) -> list[tuple[str, bytes]]:
        out = []
        for p in sorted((self.root / "locks").iterdir()):
            try:
                out.append((p.name, _read_bounded(p, MAX_LOCK_OBJECT, f"lock {p.name}")))
            except FileNotFoundError:
                continue
            except (OSError, StoreError) as e:
                log.warning("%s: skipping stray lock %s: %s", self.url, p.name[:80], e)
        return out

    def delete_lock(self, name: str) -> None:
        (self.root / "locks" / name).unlink(missing_ok=True)

    def lock_states(self) -> list[LockState]:
        """Ages from mtimes, all set by the file system's clock: the lock's against a probe file's."""
        locks = []
        for p in sorted((self.root / "locks").iterdir()):
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_size <= MAX_LOCK_OBJECT:  # what list_locks would read
                locks.append((p.name, st))
        if not locks:
            return []
        probe = self.root / "tmp" / f"clock-{secrets.token_hex(6)}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            os.close(fd)
            now = probe.stat().st_mtime_ns
        finally:
            probe.unlink(missing_ok=True)
        return [
            LockState(name, f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}", (now - st.st_mtime_ns) / 1e9)
            for name, st in locks
        ]

    def flush_chunks(self) -> None:
        self.sync()


def _read_bounded(path: Path, limit: int, what: str) -> bytes:
    """A regular file's bytes, refusing (TooLarge) one over limit before reading it."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"{what} is not a regular file")
        if st.st_size > limit:
            raise TooLarge(f"{what} is {st.st_size} bytes, over the {limit}-byte limit")
        with open(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise TooLarge(f"{what} grew over the {limit}-byte limit")
    return data


def _tighten(path: Path) -> None:
    """Make a store directory 0700 (stores made by older versions were 0755)."""
    try:
        st = os.lstat(path)
        if stat.S_IMODE(st.st_mode) & 0o077 and st.st_uid == os.geteuid():
            os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o077)
    except OSError as e:
        log.warning("cannot restrict permissions of %s: %s", path, e)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
