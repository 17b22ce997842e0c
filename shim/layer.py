"""Writable-layer capture and restore: an overlay upper dir <-> an OCI-style tar layer.

Capture turns an upper dir into `rootfs-diff.tar` (PAX; whiteouts as `.wh.<name>`, opaque dirs as
`.wh..wh..opq`, xattrs as SCHILY.xattr.*, hardlinks as link entries, sparse files as GNU sparse 1.0)
plus `rootfs-diff.json` (sha256, sizes, counts). Restore applies such a tar to an EMPTY upper dir,
turning whiteouts back into 0:0 character devices and opaque markers into trusted.overlay.opaque.

Restore treats the tar as hostile: no absolute or `..` paths, no path through a symlink, no
relative symlink that climbs out of the root, no device nodes, no overlay-internal xattrs, no
oversized names. Files are opened with O_NOFOLLOW|O_EXCL, so nothing is written outside `upper`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from shim import libc
from shim.errors import FailedPrecondition, InvalidArgument, NotFound
from shim.faults import crash_point

log = logging.getLogger(__name__)
T = TypeVar("T")

LAYER_FILE = "rootfs-diff.tar"
LAYER_INFO = "rootfs-diff.json"
MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_XATTR_PREFIX = "trusted.overlay."
OPAQUE_XATTR = "trusted.overlay.opaque"
# Overlay features that store data outside the upper dir; a layer using them cannot be captured.
UNSUPPORTED_XATTRS = ("trusted.overlay.redirect", "trusted.overlay.metacopy")
ALLOWED_XATTR_PREFIXES = ("user.", "security.", "trusted.", "system.posix_acl_")

NAME_MAX = 255
PATH_MAX = 4096
_BLOCK = 512
_COPY_CHUNK = 1 << 20
# Up to this many files and directories, an applied layer is made durable by fsyncing each of them;
# above it by one syncfs. syncfs writes back every dirty page of the file system, and a restore has
# just written the job's memory (GiBs of CRIU images) to the same disk: ~0.9 s per dirty GiB here,
# where fsyncing a few hundred small files costs ~0.1 s; thousands of fsyncs (one journal commit each)
# cost more than one syncfs (bench/RESULTS.md, "Restore, part by part").
FSYNC_EACH_MAX = 256


class LayerError(InvalidArgument):
    """A diff that must not be applied (hostile or malformed); nothing of it is kept."""


@dataclass
class LayerInfo:
    sha256: str
    size: int  # bytes of the tar
    entries: int
    data_bytes: int  # file content bytes (holes of sparse files excluded)
    whiteouts: int = 0
    opaque_dirs: int = 0
    skipped: list[str] = field(default_factory=list)  # sockets/devices capture cannot carry
    media_type: str = MEDIA_TYPE
    # What the layer sits on: the chain ID of the image's top layer (the container snapshot's
    # parent, e.g. "sha256:..."). A restore onto another base is refused when both are known.
    base: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)


# ------------------------------------------------------------------------------------ capture


def upper_dir_of(mounts: Iterable[Any], *, parentless_bind: bool = False) -> Path | None:
    """The directory holding a container's writable layer, found in its rootfs mounts; None if there is none.

    `mounts` are containerd.types.Mount messages (CreateTaskRequest.rootfs, Snapshots.Mounts) or anything
    with .type, .source and .options (overlay.Mount). The first match wins:
    - an `overlay` mount with `upperdir=`: that dir (an active snapshot of any overlay snapshotter; a
      read-only view has no upperdir= and is skipped);
    - with `parentless_bind=True`, a `bind` mount with `rw`: its source. An overlay snapshotter returns
      that for an active snapshot without a parent, whose whole tree is the layer. Protection leaves it
      off: the same mount from a non-overlay snapshotter (native) is a full copy of the image, not a diff.
    A rootfs mounted before the shim ran (dockerd passes no rootfs mounts) is not in `mounts`: protection
    finds its overlay in /proc/self/mountinfo instead (shim.protect.manager.premounted_rootfs).
    """
    for m in mounts:
        opts = list(m.options)
        if m.type == "overlay":
            for o in opts:
                if o.startswith("upperdir="):
                    return Path(o.removeprefix("upperdir="))
        elif parentless_bind and m.type == "bind" and "rw" in opts:
            return Path(m.source)
    return None


def _required_upper_dir(mounts: Iterable[Any]) -> Path:
    """upper_dir_of for the codec's own capture/restore from a snapshot's mounts: a writable dir or a clear error."""
    mounts = list(mounts)
    upper = upper_dir_of(mounts, parentless_bind=True)
    if upper is None:
        kinds = ", ".join(m.type for m in mounts) or "none"
        raise InvalidArgument(f"no writable layer among the snapshot's mounts ({kinds}): not an active snapshot")
    return upper


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for n in names:
        with contextlib.suppress(OSError):
            out[n] = os.getxattr(path, n, follow_symlinks=False)
    return out


class _SparseReader:
    """Reads a GNU sparse 1.0 member body: the decimal map padded to a block, then the data."""

    def __init__(self, fd: int, segs: list[tuple[int, int]]) -> None:
        text = f"{len(segs)}\n" + "".join(f"{o}\n{n}\n" for o, n in segs)
        raw = text.encode()
        self.header = raw + b"\0" * (-len(raw) % _BLOCK)
        self.fd, self.segs = fd, segs
        self.size = len(self.header) + sum(n for _, n in segs)
        self._parts = self._iter()
        self._buf = b""

    def _iter(self) -> Iterable[bytes]:
        yield self.header
        for off, n in self.segs:
            done = 0
            while done < n:
                chunk = os.pread(self.fd, min(_COPY_CHUNK, n - done), off + done)
                if not chunk:
                    raise OSError(f"file shrank while capturing (at {off + done})")
                done += len(chunk)
                yield chunk

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            part = next(self._parts, None)
            if part is None:
                break
            self._buf += part
        if n < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out


def _walk_sorted(root: str) -> Iterable[tuple[str, str]]:
    """(absolute path, relative path) of everything under root, parents before children, sorted."""
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        abs_dir = os.path.join(root, rel_dir) if rel_dir else root
        names = sorted(os.listdir(abs_dir))
        subdirs = []
        for name in names:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            path = os.path.join(abs_dir, name)
            yield path, rel
            if stat.S_ISDIR(os.lstat(path).st_mode):
                subdirs.append(rel)
        stack.extend(reversed(subdirs))


def _base_info(rel: str, st: os.stat_result, xattrs: dict[str, bytes]) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(rel)
    ti.mode = stat.S_IMODE(st.st_mode)
    ti.uid, ti.gid = st.st_uid, st.st_gid
    ti.uname = ti.gname = ""
    ti.mtime = st.st_mtime_ns / 1e9
    for k, v in xattrs.items():
        # surrogateescape keeps binary values (security.capability) byte-exact through PAX.
        ti.pax_headers["SCHILY.xattr." + k] = v.decode("utf-8", "surrogateescape")
    return ti


class _HashingWriter:
    """A write-only file for tarfile that hashes what passes through (no second read of the tar)."""

    def __init__(self, raw: Any, digest: Any) -> None:
        self.raw, self.digest = raw, digest

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return int(self.raw.write(data))

    def tell(self) -> int:
        return int(self.raw.tell())


def capture_writable_layer(
    source: str | Path | Sequence[Any], out_dir: str | Path, base: str | None = None, *, durable: bool = True
) -> LayerInfo:
    """Write the diff held by an overlay upper dir (or by a snapshot's mounts) into out_dir.

    Creates out_dir/rootfs-diff.tar and out_dir/rootfs-diff.json; returns the LayerInfo. The
    container should be paused or frozen so the tree does not change while it is read. `base`:
    the parent chain ID of the container's snapshot (containerd Snapshots.Stat(...).info.parent),
    recorded so a restore onto a different image is refused. The tar is hashed as it is written;
    `durable=False` skips its fsync (a checkpoint's staging: read once for the upload and removed, and
    the capture runs while the task is frozen, where an fsync would wait on the disk).
    """
    upper = str(source) if isinstance(source, (str, Path)) else str(_required_upper_dir(source))
    if not os.path.isdir(upper):
        raise NotFound(f"upper dir {upper} does not exist")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tar_path = out / LAYER_FILE
    info = LayerInfo(sha256="", size=0, entries=0, data_bytes=0, base=base)
    seen_inodes: dict[tuple[int, int], str] = {}
    tmp = tar_path.with_suffix(".tar.part")
    h = hashlib.sha256()
    with (
        open(tmp, "wb") as raw,
        tarfile.open(
            fileobj=_HashingWriter(raw, h),
            mode="w",
            format=tarfile.PAX_FORMAT,
            encoding="utf-8",
            errors="surrogateescape",
        ) as tf,
    ):
        for path, rel in _walk_sorted(upper):
            st = os.lstat(path)
            mode = st.st_mode
            parent, _, name = rel.rpartition("/")
            if stat.S_ISCHR(mode) and st.st_rdev == 0:
                # overlay whiteout -> OCI whiteout file
                ti = tarfile.TarInfo(f"{parent}/{WHITEOUT_PREFIX}{name}" if parent else WHITEOUT_PREFIX + name)
                ti.mode, ti.mtime = 0o644, st.st_mtime
                tf.addfile(ti)
                info.whiteouts += 1
                info.entries += 1
                continue
            xattrs = _xattrs(path)
            for bad in UNSUPPORTED_XATTRS:
                if bad in xattrs:
                    raise FailedPrecondition(
                        f"{rel}: overlay {bad} is set (redirect_dir/metacopy): this layer cannot be"
                        " captured from the upper dir alone"
                    )
            opaque = xattrs.get(OPAQUE_XATTR) == b"y"
            xattrs = {k: v for k, v in xattrs.items() if not k.startswith(OVERLAY_XATTR_PREFIX)}
            ti = _base_info(rel, st, xattrs)
            if stat.S_ISDIR(mode):
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
                if opaque:
                    marker = tarfile.TarInfo(f"{rel}/{OPAQUE_MARKER}")
                    marker.mode, marker.mtime = 0o644, st.st_mtime
                    tf.addfile(marker)
                    info.opaque_dirs += 1
                    info.entries += 1
            elif stat.S_ISLNK(mode):
                ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(path)
                tf.addfile(ti)
            elif stat.S_ISFIFO(mode):
                ti.type = tarfile.FIFOTYPE
                tf.addfile(ti)
            elif stat.S_ISREG(mode):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in seen_inodes:
                    ti.type, ti.linkname = tarfile.LNKTYPE, seen_inodes[key]
                    tf.addfile(ti)
                else:
                    if st.st_nlink > 1:
                        seen_inodes[key] = rel
                    info.data_bytes += _add_regular(tf, ti, path, st)
            else:
                log.warning("capture: skipping %s (socket or device node, not carried across nodes)", rel)
                info.skipped.append(rel)
                continue
            info.entries += 1
        tf.close()  # the end-of-archive blocks go through the hashing writer too
        if durable:
            raw.flush()
            os.fsync(raw.fileno())
    os.replace(tmp, tar_path)
    info.sha256, info.size = "sha256:" + h.hexdigest(), tar_path.stat().st_size
    (out / LAYER_INFO).write_text(info.to_json())
    log.info(
        "captured %s: %d entries, %d data bytes, %d whiteouts, %d opaque dirs -> %s",
        upper,
        info.entries,
        info.data_bytes,
        info.whiteouts,
        info.opaque_dirs,
        tar_path,
    )
    return info


def _add_regular(tf: tarfile.TarFile, ti: tarfile.TarInfo, path: str, st: os.stat_result) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        size = st.st_size
        ti.type = tarfile.REGTYPE
        if size > 0 and st.st_blocks * 512 < size:
            from shim.store.walk import data_extents  # lazily: the store package is heavy to import

            segs = list(data_extents(fd, size))
            reader = _SparseReader(fd, segs)
            real_name = ti.name
            dirname, _, base = real_name.rpartition("/")
            ti.name = f"{dirname}/GNUSparseFile.0/{base}" if dirname else f"GNUSparseFile.0/{base}"
            ti.pax_headers.update(
                {
                    "GNU.sparse.major": "1",
                    "GNU.sparse.minor": "0",
                    "GNU.sparse.name": real_name,
                    "GNU.sparse.realsize": str(size),
                }
            )
            ti.size = reader.size
            tf.addfile(ti, reader)  # type: ignore[arg-type]
            return sum(n for _, n in segs)
        ti.size = size
        with os.fdopen(os.dup(fd), "rb") as f:
            tf.addfile(ti, f)
        return size
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------ restore


def _check_name(name: str, what: str = "entry") -> list[str]:
    """Validated path components of a tar member name (relative, no `..`, sane lengths)."""
    if "\0" in name:
        raise LayerError(f"{what} {name!r}: NUL in name")
    if len(name.encode("utf-8", "surrogateescape")) > PATH_MAX:
        raise LayerError(f"{what} {name[:64]!r}...: path longer than {PATH_MAX} bytes")
    if name.startswith("/"):
        raise LayerError(f"{what} {name!r}: absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    for p in parts:
        if p == "..":
            raise LayerError(f"{what} {name!r}: '..' in path")
        if len(p.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise LayerError(f"{what} {name[:64]!r}...: name component longer than {NAME_MAX} bytes")
    return parts


class _Applier:
    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.dir_times: list[tuple[str, int]] = []
        self.stats = {"entries": 0, "whiteouts": 0, "opaque_dirs": 0}
        # What durable() flushes: every file written and every directory that holds an entry.
        self.files: list[str] = []
        self.dirs: set[str] = {self.root}

    def _parent(self, parts: list[str], entry: str, create: bool = True) -> str:
        """Absolute parent dir of parts, creating missing dirs; refuses any symlink on the way."""
        cur = self.root
        for p in parts[:-1]:
            cur = os.path.join(cur, p)
            self.dirs.add(cur)
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                if not create:
                    raise LayerError(f"entry {entry!r}: {os.path.relpath(cur, self.root)!r} does not exist") from None
                os.mkdir(cur, 0o755)
                continue
            if stat.S_ISLNK(st.st_mode):
                raise LayerError(f"entry {entry!r}: path goes through symlink {os.path.relpath(cur, self.root)!r}")
            if not stat.S_ISDIR(st.st_mode):
                raise LayerError(f"entry {entry!r}: {os.path.relpath(cur, self.root)!r} is not a directory")
        return cur

    def _clear(self, path: str, keep_dir: bool) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return
            shutil.rmtree(path)  # rmtree never follows symlinks
        else:
            os.unlink(path)

    def apply(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = _check_name(m.name)
        if not parts:
            return  # the root itself: the snapshot's own dir keeps its mode
        self.stats["entries"] += 1
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(m, parts)
            return
        parent = self._parent(parts, m.name)
        path = os.path.join(parent, base)
        if m.isdir():
            self.dirs.add(path)
            self._clear(path, keep_dir=True)
            if not os.path.isdir(path):
                os.mkdir(path, 0o700)
            self.dir_times.append((path, int(m.mtime * 1e9)))
        elif m.issym():
            if not m.linkname or len(m.linkname.encode("utf-8", "surrogateescape")) > PATH_MAX:
                raise LayerError(f"symlink {m.name!r}: bad target length")
            if not m.linkname.startswith("/"):
                target = os.path.normpath(os.path.join(os.path.dirname("/".join(parts)), m.linkname))
                if target == ".." or target.startswith("../"):
                    raise LayerError(f"symlink {m.name!r} -> {m.linkname!r} points outside the root")
            self._clear(path, keep_dir=False)
            os.symlink(m.linkname, path)
        elif m.islnk():
            tparts = _check_name(m.linkname, "hardlink target of " + repr(m.name))
            if not tparts:
                raise LayerError(f"hardlink {m.name!r}: empty target")
            tparent = self._parent(tparts, m.name, create=False)  # no symlink on the way
            target = os.path.join(tparent, tparts[-1])
            try:
                tst = os.lstat(target)
            except FileNotFoundError:
                raise LayerError(f"hardlink {m.name!r} -> {m.linkname!r}: target not in the layer") from None
            if stat.S_ISDIR(tst.st_mode):
                raise LayerError(f"hardlink {m.name!r} -> {m.linkname!r}: target is a directory")
            if os.path.normpath(target) == os.path.normpath(path):  # clearing the name would remove the target
                raise LayerError(f"hardlink {m.name!r} -> {m.linkname!r}: links to itself")
            self._clear(path, keep_dir=False)
            os.link(target, path, follow_symlinks=False)
            return  # a hardlink shares the target's inode: no metadata of its own
        elif m.isfifo():
            self._clear(path, keep_dir=False)
            os.mkfifo(path, 0o600)
        elif m.isreg():
            self._clear(path, keep_dir=False)
            self._write_file(tf, m, path)
        else:
            kind = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device"}.get(m.type, "entry")
            raise LayerError(f"{kind} {m.name!r} (type {m.type!r}) is not allowed in a writable layer diff")
        self._metadata(m, path)

    def _whiteout(self, m: tarfile.TarInfo, parts: list[str]) -> None:
        parent = self._parent(parts, m.name)
        base = parts[-1]
        if base == OPAQUE_MARKER:
            os.setxattr(parent, OPAQUE_XATTR, b"y", follow_symlinks=False)
            self.stats["opaque_dirs"] += 1
            return
        hidden = base[len(WHITEOUT_PREFIX) :]
        if hidden in ("", ".", "..") or hidden.startswith(WHITEOUT_PREFIX):
            raise LayerError(f"whiteout {m.name!r}: bad name")
        path = os.path.join(parent, hidden)
        self._clear(path, keep_dir=False)
        os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))  # overlay's whiteout: 0:0 char device
        self.stats["whiteouts"] += 1

    def _write_file(self, tf: tarfile.TarFile, m: tarfile.TarInfo, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            src = tf.fileobj
            assert src is not None
            if m.sparse is not None:
                src.seek(m.offset_data)
                for off, n in m.sparse:
                    _copy_range(src, fd, off, n, m.name)
            else:
                src.seek(m.offset_data)
                _copy_range(src, fd, 0, m.size, m.name)
            os.ftruncate(fd, m.size)
        finally:
            os.close(fd)
        self.files.append(path)

    def _metadata(self, m: tarfile.TarInfo, path: str) -> None:
        os.lchown(path, m.uid, m.gid)
        for k, v in m.pax_headers.items():
            if not k.startswith("SCHILY.xattr."):
                continue
            name = k[len("SCHILY.xattr.") :]
            if name.startswith(OVERLAY_XATTR_PREFIX) or not name.startswith(ALLOWED_XATTR_PREFIXES):
                raise LayerError(f"entry {m.name!r}: xattr {name!r} is not allowed")
            try:
                os.setxattr(path, name, v.encode("utf-8", "surrogateescape"), follow_symlinks=False)
            except OSError as e:  # e.g. user.* on a symlink (EPERM), a value too large (E2BIG)
                raise LayerError(f"entry {m.name!r}: xattr {name!r} cannot be set: {e.strerror}") from None
        if not m.issym():
            os.chmod(path, stat.S_IMODE(m.mode))  # after chown, which clears setuid bits
        if not m.isdir():
            os.utime(path, ns=(int(m.mtime * 1e9),) * 2, follow_symlinks=False)

    def finish(self) -> None:
        for path, mtime_ns in reversed(self.dir_times):  # children first: their writes touch parents
            # A later entry may have replaced the directory or one above it (`a/a`, then `a` a file):
            # the last entry wins, as in any tar.
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)

    def durable(self) -> None:
        """Put the applied tree on disk: each file written (data and inode), then each directory (its
        entries: links, symlinks, fifos, whiteouts; its own xattrs and times), or one syncfs for a large
        tree. The directories go last, so a journalling file system commits every earlier change with them."""
        if len(self.files) + len(self.dirs) > FSYNC_EACH_MAX:
            libc.syncfs(self.root)
            return
        for path in dict.fromkeys([*self.files, *sorted(self.dirs, reverse=True)]):  # children dirs first
            _fsync_if_file_or_dir(path)


def _fsync_if_file_or_dir(path: str) -> None:
    """fsync what is at path now, if it is a regular file or a directory. A later entry of the same tar
    may have removed it (a whiteout) or replaced it with another kind (a directory by a file, a file by
    a symlink): what is gone needs no fsync, and anything else is never opened (a device or a fifo could
    act on an open); its parent directory's fsync records the entry."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # removed, or a directory above it replaced by a file
        return
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        now = os.fstat(fd)
        if (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev):
            os.fsync(fd)
    finally:
        os.close(fd)


def _copy_range(src: Any, fd: int, offset: int, n: int, name: str) -> None:
    """Copy n bytes from src to fd at offset, leaving all-zero blocks as holes."""
    done = 0
    zero = bytes(_COPY_CHUNK)
    while done < n:
        chunk = src.read(min(_COPY_CHUNK, n - done))
        if not chunk:
            raise LayerError(f"entry {name!r}: truncated tar data")
        if chunk != zero[: len(chunk)]:
            os.pwrite(fd, chunk, offset + done)
        done += len(chunk)


def apply_writable_layer(tar_path: str | Path, upper: str | Path) -> dict[str, int]:
    """Apply a captured diff to the empty upper dir `upper`. On error the caller discards upper."""
    upper = Path(upper)
    if any(upper.iterdir()):
        raise FailedPrecondition(f"restore target {upper} is not empty")
    applier = _Applier(upper)
    try:
        with tarfile.open(tar_path, "r:", encoding="utf-8", errors="surrogateescape") as tf:
            for m in tf:
                applier.apply(tf, m)
                if applier.stats["entries"] == 2:
                    crash_point("restore-mid-apply")
    except tarfile.TarError as e:  # a damaged or forged header
        raise LayerError(f"{tar_path}: not a valid tar: {e}") from None
    applier.finish()
    applier.durable()  # the snapshot row is committed next: its files must be on disk before that
    return applier.stats


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_COPY_CHUNK), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def chain_id_of(parent_key: str) -> str:
    """The image chain ID in a snapshot key: containerd hands proxy snapshotters keys of the form
    <namespace>/<n>/<key>; direct callers use the bare key."""
    m = re.match(r"^[^/]+/\d+/(.+)$", parent_key)
    return m.group(1) if m else parent_key


def verify_layer(dir_: Path, expected_base: str | None = None) -> Path:
    """The layer tar in a fetched checkpoint dir, after checking it against its recorded digest
    and, when both are known, that it was captured on `expected_base`."""
    found = sorted(dir_.rglob(LAYER_FILE))
    if not found:
        raise NotFound(f"checkpoint has no writable layer ({LAYER_FILE})")
    if len(found) > 1:
        raise FailedPrecondition(f"checkpoint holds several writable layers: {[str(p) for p in found]}")
    tar_path = found[0]
    info_path = tar_path.with_name(LAYER_INFO)
    if info_path.exists():
        recorded = json.loads(info_path.read_text())
        base = recorded.get("base")
        if expected_base and base and chain_id_of(expected_base) != base:
            raise FailedPrecondition(
                f"the writable layer was captured on base {base}, this rootfs sits on"
                f" {chain_id_of(expected_base)}: a different image"
            )
        want = recorded["sha256"]
        got = sha256_file(tar_path)
        if got != want:
            raise FailedPrecondition(f"writable layer digest mismatch: recorded {want}, fetched {got}")
    return tar_path


def restore_writable_layer(
    store_url: str, key: str, seq: int | None, upper: Path, expected_base: str | None = None
) -> dict[str, Any]:
    """Fetch checkpoint `key` (seq, or the latest usable one) and fill the empty `upper` from it."""
    from shim.store import CheckpointNotFound, StoreError, open_store

    scratch = Path(tempfile.mkdtemp(prefix="restore-", dir=upper.parent))
    try:
        where = f"{key}{'@' + str(seq) if seq is not None else ''}"
        try:
            with open_store(store_url) as store:
                # The store verifies every chunk against its BLAKE3 digest; with no seq it falls
                # back to the previous checkpoint when the latest is damaged.
                ckpt = store.get(key, scratch, seq=seq, fallback=seq is None)
        except CheckpointNotFound as e:
            raise NotFound(f"checkpoint {where}: {e}") from e
        except (StoreError, ValueError) as e:
            raise FailedPrecondition(f"checkpoint {where}: cannot fetch from {store_url}: {e}") from e
        tar_path = verify_layer(scratch, expected_base)
        stats = apply_writable_layer(tar_path, upper)
        log.info("restored writable layer of %s seq=%s into %s: %s", key, getattr(ckpt, "seq", "?"), upper, stats)
        return {"seq": getattr(ckpt, "seq", None), **stats}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def restore_writable_layer_into_mounts(
    mounts: Sequence[Any], store_url: str, key: str, seq: int | None = None, expected_base: str | None = None
) -> dict[str, Any]:
    """Fill the (empty) upper dir of an already prepared rootfs from checkpoint `key`.

    For the shim, when the rootfs was prepared without the restore label (CRI, `ctr run`): works
    with any overlay snapshotter. The layer is built in a sibling directory and renamed over the
    empty upper dir in one step, so a failure or a crash never leaves a half-filled rootfs.
    """
    return fill_empty_upper_dir(
        _required_upper_dir(mounts), lambda filled: restore_writable_layer(store_url, key, seq, filled, expected_base)
    )


def fill_empty_upper_dir(upper: Path, fill: Callable[[Path], T]) -> T:
    """Fill the empty overlay upper dir `upper` all or nothing: `fill` builds the tree in a sibling
    directory, which then replaces `upper` in one rename, so a failure or a crash never leaves a
    half-filled rootfs."""
    if any(upper.iterdir()):
        raise FailedPrecondition(f"upper dir {upper} is not empty: the container already has a writable layer")
    st = os.stat(upper)
    staging = Path(tempfile.mkdtemp(prefix=".revenant-restore-", dir=upper.parent))
    try:
        filled = staging / "fs"
        filled.mkdir()
        result = fill(filled)
        os.chown(filled, st.st_uid, st.st_gid)
        os.chmod(filled, stat.S_IMODE(st.st_mode))
        os.rename(filled, upper)  # replaces the empty directory atomically
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def checkpoint_writable_layer(
    source: str | Path | Sequence[Any],
    store_url: str,
    key: str,
    metadata: dict[str, Any] | None = None,
    base: str | None = None,
) -> Any:
    """Capture a writable layer and put it in the store as its own checkpoint of `key`."""
    from shim.store import open_store

    with tempfile.TemporaryDirectory(prefix="revenant-layer-") as tmp:
        info = capture_writable_layer(source, tmp, base=base)
        meta = dict(metadata or {})
        meta.setdefault("writable_layer", asdict(info))
        with open_store(store_url) as store:
            return store.put(key, Path(tmp), metadata=meta)
