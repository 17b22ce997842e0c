"""Snapshot metadata in SQLite: the single source of truth for which snapshots exist.

A snapshot's directory on disk only counts once its row is committed; a row is only deleted
before its directory goes away. Every mutation runs in one `BEGIN IMMEDIATE` transaction, so a
SIGKILL at any point leaves either the old or the new state, never a mix.
"""

from __future__ import annotations

import contextlib
import enum
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shim.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, RevenantError


class Kind(enum.IntEnum):
    # Values are the wire values of containerd.services.snapshots.v1.Kind.
    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def label(self) -> str:
        # containerd's snapshots.Kind.String(), which its filters match against.
        return {1: "View", 2: "Active", 3: "Committed"}.get(int(self), "Unknown")


# The snapshotter raises revenant's domain errors; its gRPC service maps them to status codes.
SnapshotError = RevenantError


@dataclass
class Snapshot:
    id: int
    namespace: str
    key: str
    kind: Kind
    parent: str  # the parent's key (name), "" for none
    parent_id: int | None
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)
    size: int = 0
    inodes: int = 0


_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ns TEXT NOT NULL,
    key TEXT NOT NULL,
    kind INTEGER NOT NULL,
    parent_id INTEGER REFERENCES snapshots(id),
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0,
    UNIQUE (ns, key)
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
"""

_SELECT = """
SELECT s.id, s.ns, s.key, s.kind, COALESCE(p.key, ''), s.parent_id, s.created_ns, s.updated_ns,
       s.labels, s.size, s.inodes
FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id
"""


def _row(r: tuple) -> Snapshot:
    return Snapshot(
        id=r[0],
        namespace=r[1],
        key=r[2],
        kind=Kind(r[3]),
        parent=r[4],
        parent_id=r[5],
        created_ns=r[6],
        updated_ns=r[7],
        labels=json.loads(r[8]),
        size=r[9],
        inodes=r[10],
    )


class MetadataStore:
    """Thread-safe wrapper around one SQLite connection (grpc serves requests on a thread pool)."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed snapshot survives power loss
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One write transaction; commits on success, rolls back on any exception."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextlib.contextmanager
    def read(self) -> Iterator[Transaction]:
        with self._lock:
            yield Transaction(self._db)


class Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def get(self, ns: str, key: str) -> Snapshot:
        r = self._db.execute(_SELECT + " WHERE s.ns=? AND s.key=?", (ns, key)).fetchone()
        if r is None:
            raise NotFound(f"snapshot {key}: not found")
        return _row(r)

    def by_id(self, snap_id: int) -> Snapshot:
        r = self._db.execute(_SELECT + " WHERE s.id=?", (snap_id,)).fetchone()
        if r is None:
            raise NotFound(f"snapshot id {snap_id}: not found")
        return _row(r)

    def exists(self, ns: str, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM snapshots WHERE ns=? AND key=?", (ns, key)).fetchone() is not None

    def all(self, ns: str | None = None) -> list[Snapshot]:
        if ns is None:
            rows = self._db.execute(_SELECT + " ORDER BY s.id").fetchall()
        else:
            rows = self._db.execute(_SELECT + " WHERE s.ns=? ORDER BY s.id", (ns,)).fetchall()
        return [_row(r) for r in rows]

    def ids(self) -> set[int]:
        return {r[0] for r in self._db.execute("SELECT id FROM snapshots")}

    def parent_chain(self, snap: Snapshot) -> list[int]:
        """IDs of the ancestors, nearest first (the order of overlay's lowerdir=)."""
        chain: list[int] = []
        pid = snap.parent_id
        while pid is not None:
            chain.append(pid)
            r = self._db.execute("SELECT parent_id FROM snapshots WHERE id=?", (pid,)).fetchone()
            pid = r[0] if r else None
        return chain

    def has_children(self, snap_id: int) -> bool:
        return self._db.execute("SELECT 1 FROM snapshots WHERE parent_id=? LIMIT 1", (snap_id,)).fetchone() is not None

    def create(self, ns: str, key: str, kind: Kind, parent: str, labels: dict[str, str]) -> Snapshot:
        if self.exists(ns, key):
            raise AlreadyExists(f"snapshot {key}: already exists")
        parent_id = None
        if parent:
            try:
                p = self.get(ns, parent)
            except NotFound:
                raise NotFound(f"missing parent {parent!r}: not found") from None
            if p.kind != Kind.COMMITTED:
                raise InvalidArgument(f"parent {parent!r} is not committed snapshot: invalid argument")
            parent_id = p.id
        now = time.time_ns()
        cur = self._db.execute(
            "INSERT INTO snapshots (ns, key, kind, parent_id, created_ns, updated_ns, labels) VALUES (?,?,?,?,?,?,?)",
            (ns, key, int(kind), parent_id, now, now, json.dumps(labels, sort_keys=True)),
        )
        return self.by_id(int(cur.lastrowid))

    def commit_active(self, ns: str, key: str, name: str, labels: dict[str, str], size: int, inodes: int) -> Snapshot:
        """Turn active `key` into committed `name`; the id (and so the directory) is kept."""
        snap = self.get(ns, key)
        if snap.kind != Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {key} is not active: failed precondition")
        if self.exists(ns, name):
            raise AlreadyExists(f"snapshot {name}: already exists")
        now = time.time_ns()
        self._db.execute(
            "UPDATE snapshots SET key=?, kind=?, labels=?, size=?, inodes=?, created_ns=?, updated_ns=? WHERE id=?",
            (name, int(Kind.COMMITTED), json.dumps(labels, sort_keys=True), size, inodes, now, now, snap.id),
        )
        return self.by_id(snap.id)

    def remove(self, ns: str, key: str) -> Snapshot:
        snap = self.get(ns, key)
        if self.has_children(snap.id):
            raise FailedPrecondition(f"cannot remove snapshot {key} with child: failed precondition")
        self._db.execute("DELETE FROM snapshots WHERE id=?", (snap.id,))
        return snap

    def set_labels(self, snap_id: int, labels: dict[str, str]) -> Snapshot:
        self._db.execute(
            "UPDATE snapshots SET labels=?, updated_ns=? WHERE id=?",
            (json.dumps(labels, sort_keys=True), time.time_ns(), snap_id),
        )
        return self.by_id(snap_id)
