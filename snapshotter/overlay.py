"""Overlay snapshots with containerd's overlayfs semantics, metadata in SQLite.

Layout under --root (the same shape as containerd's overlayfs snapshotter):
    metadata.db              SQLite, the truth about which snapshots exist
    snapshots/<id>/fs        upper (or, for a layer without parent, the whole tree)
    snapshots/<id>/work      overlay workdir (active snapshots only)
    snapshots/new-*          a snapshot being built; renamed to <id> inside the creating transaction
    snapshots/rm-*           a removed snapshot being deleted
Crash rules: a directory without a committed row is a leftover (start-up and Cleanup delete it); a
row is deleted before its directory, so a committed snapshot never loses its data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from shim.faults import crash_point
from snapshotter import filters as flt
from snapshotter.metadata import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Kind,
    MetadataStore,
    NotFound,
    Snapshot,
)

log = logging.getLogger(__name__)

# Labels that ask Prepare to fill the new upper dir from a checkpoint's writable layer.
# containerd only forwards labels under containerd.io/snapshot/ to a snapshotter, so the
# prefixed form is the one that works through containerd; the bare form is for direct callers.
LABEL_RESTORE_FROM = "containerd.io/snapshot/revenant.io/restore-from"
LABEL_STORE = "containerd.io/snapshot/revenant.io/store"
_BARE_RESTORE_FROM = "revenant.io/restore-from"
_BARE_STORE = "revenant.io/store"


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]
    target: str = ""


@dataclass(frozen=True)
class Usage:
    size: int
    inodes: int


def disk_usage(root: Path) -> Usage:
    """containerd 1.6.20's fs.DiskUsage: allocated bytes (st_blocks * 512), each inode counted once."""
    seen: set[tuple[int, int]] = set()
    size = 0

    def visit(path: str) -> None:
        nonlocal size
        st = os.lstat(path)
        ino = (st.st_dev, st.st_ino)
        if ino not in seen:
            seen.add(ino)
            size += st.st_blocks * 512

    visit(str(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            visit(os.path.join(dirpath, name))
    return Usage(size=size, inodes=len(seen))


def _overlay_supports_index() -> bool:
    # containerd 1.6 adds index=off whenever the overlay module exposes the index parameter.
    return os.path.exists("/sys/module/overlay/parameters/index")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def restore_request(labels: dict[str, str]) -> tuple[str, int | None, str | None] | None:
    """(checkpoint key, seq or None for latest, store url or None) if the labels ask for a restore."""
    spec = labels.get(LABEL_RESTORE_FROM) or labels.get(_BARE_RESTORE_FROM)
    if not spec:
        return None
    store = labels.get(LABEL_STORE) or labels.get(_BARE_STORE) or None
    key, sep, seq_text = spec.rpartition("@")
    if sep and seq_text.isdigit() and key:
        return key, int(seq_text), store
    return spec, None, store


class OverlaySnapshotter:
    def __init__(self, root: Path, store_url: str | None = None) -> None:
        self.root = Path(root)
        self.store_url = store_url
        self.snapshots_dir = self.root / "snapshots"
        self.snapshots_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.meta = MetadataStore(self.root / "metadata.db")
        self.index_off = _overlay_supports_index()
        # Nothing is in flight at start-up, so every directory without a row is a leftover of a
        # crash. (containerd 1.6 cannot send Cleanup to a proxy snapshotter, so do it here.)
        self.cleanup(include_new=True)

    def close(self) -> None:
        self.meta.close()

    # ---- paths -------------------------------------------------------------------------------
    def upper_path(self, snap_id: int) -> Path:
        return self.snapshots_dir / str(snap_id) / "fs"

    def work_path(self, snap_id: int) -> Path:
        return self.snapshots_dir / str(snap_id) / "work"

    # ---- mounts ------------------------------------------------------------------------------
    def _mounts(self, snap: Snapshot, chain: list[int]) -> list[Mount]:
        """Exactly the mounts containerd 1.6's overlayfs snapshotter returns."""
        if not chain:
            ro = "ro" if snap.kind == Kind.VIEW else "rw"
            return [Mount(type="bind", source=str(self.upper_path(snap.id)), options=(ro, "rbind"))]
        options: list[str] = []
        if self.index_off:
            options.append("index=off")
        if snap.kind == Kind.ACTIVE:
            options += [f"workdir={self.work_path(snap.id)}", f"upperdir={self.upper_path(snap.id)}"]
        elif len(chain) == 1:
            return [Mount(type="bind", source=str(self.upper_path(chain[0])), options=("ro", "rbind"))]
        options.append("lowerdir=" + ":".join(str(self.upper_path(i)) for i in chain))
        return [Mount(type="overlay", source="overlay", options=tuple(options))]

    # ---- RPC operations ------------------------------------------------------------------------
    def prepare(self, ns: str, key: str, parent: str, labels: dict[str, str], kind: Kind = Kind.ACTIVE) -> list[Mount]:
        if not key:
            raise InvalidArgument("snapshot key must not be empty: invalid argument")
        restore = restore_request(labels) if kind == Kind.ACTIVE else None
        if restore is not None:
            with self.meta.read() as tx:  # fail fast, before an expensive download
                if tx.exists(ns, key):
                    raise AlreadyExists(f"snapshot {key}: already exists")
                if parent:
                    p = tx.get(ns, parent)
                    if p.kind != Kind.COMMITTED:
                        raise InvalidArgument(f"parent {parent!r} is not committed snapshot: invalid argument")
        td = Path(tempfile.mkdtemp(prefix="new-", dir=self.snapshots_dir))
        target: Path | None = None
        try:
            os.mkdir(td / "fs", 0o755)
            os.chmod(td / "fs", 0o755)  # umask must not decide what containers see
            if kind == Kind.ACTIVE:
                os.mkdir(td / "work", 0o711)
            if restore is not None:
                self._restore_into(td / "fs", *restore, parent=parent)
            crash_point("prepare-before-commit")
            with self.meta.transaction() as tx:
                snap = tx.create(ns, key, kind, parent, labels)
                chain = tx.parent_chain(snap)
                if chain:
                    st = os.stat(self.upper_path(chain[0]))
                    os.lchown(td / "fs", st.st_uid, st.st_gid)
                target = self.snapshots_dir / str(snap.id)
                if target.exists():
                    # Left by a crash between rename and commit (the id was never committed).
                    shutil.rmtree(target)
                os.rename(td, target)
                _fsync_dir(self.snapshots_dir)
                mounts = self._mounts(snap, chain)
                crash_point("prepare-after-rename")
            crash_point("prepare-after-commit")
            log.info(
                "prepared %s/%s kind=%s parent=%r id=%d%s",
                ns,
                key,
                kind.label,
                parent,
                snap.id,
                f" restored from {restore[0]}" if restore else "",
            )
            return mounts
        except BaseException:
            shutil.rmtree(td, ignore_errors=True)
            if target is not None and target.exists():
                with self.meta.read() as tx:
                    committed = snap.id in tx.ids()
                if not committed:
                    shutil.rmtree(target, ignore_errors=True)
            raise

    def _restore_into(self, upper: Path, ckpt_key: str, seq: int | None, store_url: str | None, parent: str) -> None:
        from shim.layer import restore_writable_layer

        url = store_url or self.store_url
        if not url:
            raise InvalidArgument(
                f"restore of {ckpt_key!r} asked but no store: set label {LABEL_STORE} or --store: invalid argument"
            )
        restore_writable_layer(url, ckpt_key, seq, upper, expected_base=parent or None)

    def mounts(self, ns: str, key: str) -> list[Mount]:
        with self.meta.read() as tx:
            snap = tx.get(ns, key)
            if snap.kind not in (Kind.ACTIVE, Kind.VIEW):
                raise FailedPrecondition(f"requested snapshot {key} not active or view: failed precondition")
            return self._mounts(snap, tx.parent_chain(snap))

    def commit(self, ns: str, name: str, key: str, labels: dict[str, str]) -> None:
        if not name:
            raise InvalidArgument("commit name must not be empty: invalid argument")
        with self.meta.read() as tx:
            snap = tx.get(ns, key)
        if snap.kind != Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {key} is not active: failed precondition")
        # Measured outside the lock: a big upper dir takes a while and must not stall other calls.
        try:
            usage = disk_usage(self.upper_path(snap.id))
        except FileNotFoundError:
            raise NotFound(f"snapshot {key}: removed while committing: not found") from None
        with self.meta.transaction() as tx:
            if tx.get(ns, key).id != snap.id:
                raise NotFound(f"snapshot {key}: replaced while committing: not found")
            tx.commit_active(ns, key, name, labels, usage.size, usage.inodes)
            crash_point("commit-before-commit")
        crash_point("commit-after-commit")
        log.info("committed %s/%s as %s (id=%d, %d bytes)", ns, key, name, snap.id, usage.size)

    def remove(self, ns: str, key: str) -> None:
        with self.meta.transaction() as tx:
            snap = tx.remove(ns, key)
        # The row is gone for good; from here on the directory is a leftover if we crash.
        crash_point("remove-after-commit")
        src = self.snapshots_dir / str(snap.id)
        dead = self.snapshots_dir / f"rm-{snap.id}-{os.urandom(4).hex()}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(src, dead)
            crash_point("remove-after-rename")
            shutil.rmtree(dead, ignore_errors=True)
        log.info("removed %s/%s (id=%d)", ns, key, snap.id)

    def stat(self, ns: str, key: str) -> Snapshot:
        with self.meta.read() as tx:
            return tx.get(ns, key)

    def update(self, ns: str, name: str, labels: dict[str, str], paths: list[str]) -> Snapshot:
        with self.meta.transaction() as tx:
            snap = tx.get(ns, name)
            if not paths:
                new = dict(labels)
            else:
                new = dict(snap.labels)
                for p in paths:
                    if p == "labels":
                        new = dict(labels)
                    elif p.startswith("labels."):
                        k = p[len("labels.") :]
                        if k in labels:
                            new[k] = labels[k]
                        else:
                            new.pop(k, None)
                    else:
                        raise InvalidArgument(f"cannot update {p!r} field on snapshot {name}: invalid argument")
            return tx.set_labels(snap.id, new)

    def usage(self, ns: str, key: str) -> Usage:
        with self.meta.read() as tx:
            snap = tx.get(ns, key)
        if snap.kind == Kind.ACTIVE:
            try:
                return disk_usage(self.upper_path(snap.id))
            except FileNotFoundError:
                raise NotFound(f"snapshot {key}: removed while measuring: not found") from None
        return Usage(size=snap.size, inodes=snap.inodes)

    def list(self, ns: str | None, filter_texts: list[str]) -> list[Snapshot]:
        parsed = flt.parse_all(filter_texts)
        with self.meta.read() as tx:
            snaps = tx.all(ns)
        return [s for s in snaps if flt.matches(parsed, flt.snapshot_adaptor(s.key, s.parent, s.kind.label, s.labels))]

    def cleanup(self, include_new: bool = False) -> list[str]:
        """Delete every directory under snapshots/ that no committed row owns.

        new-* directories belong to a Prepare in flight unless include_new (start-up).
        """
        doomed: list[tuple[str, str]] = []
        # Under the metadata lock: a Prepare renames its directory into place and commits its row
        # while holding it, so no live snapshot can appear between reading the rows and the scan.
        with self.meta.read() as tx:
            live = {str(i) for i in tx.ids()}
            for entry in os.scandir(self.snapshots_dir):
                if entry.name in live or (entry.name.startswith("new-") and not include_new):
                    continue
                path = entry.path
                if not entry.name.startswith("rm-"):
                    path = os.path.join(self.snapshots_dir, f"rm-{entry.name}-{os.urandom(4).hex()}")
                    try:
                        os.rename(entry.path, path)
                    except FileNotFoundError:
                        continue  # a concurrent Remove got there first
                doomed.append((entry.name, path))
        for _, path in doomed:
            shutil.rmtree(path, ignore_errors=True)
        removed = [name for name, _ in doomed]
        if removed:
            log.info("cleanup removed %d leftover directories: %s", len(removed), ", ".join(sorted(removed)))
        return removed
