"""The node registry of protected tasks: one JSON file per protected container (docs/control.md).

Layout: `<run_dir>/tasks/<namespace>/<container-id>.json`. The shim writes a record when it creates a
protected task, rewrites it after every checkpoint and removes it on Delete; the agent and the CLI only
read. Writers replace files atomically (tmp + rename), but readers still tolerate a file that is
half-written (a crashed writer on a filesystem without atomic rename semantics, a hand edit) or that
vanishes between listing and reading (a concurrent Delete): such a file is skipped with a warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from shim.libc import pid_alive

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = "/run/revenant"
RUN_DIR_ENV = "REVENANT_RUN_DIR"

# containerd's identifier rule for namespaces and container ids; it also keeps names path-safe.
_IDENTIFIER = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")


def default_run_dir() -> Path:
    return Path(os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR)


@dataclass
class LastCheckpoint:
    seq: int
    time: float  # wall-clock (epoch seconds) when the checkpoint was committed
    bytes_uploaded: int = 0
    duration_s: float = 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LastCheckpoint:
        return cls(
            seq=int(data["seq"]),
            time=float(data["time"]),
            bytes_uploaded=int(data.get("bytes_uploaded") or 0),
            duration_s=float(data.get("duration_s") or 0.0),
        )


KUBERNETES_FIELDS = ("pod", "pod_namespace", "container")


@dataclass
class TaskRecord:
    namespace: str
    id: str
    address: str  # the shim's ttrpc address, e.g. "unix:///run/containerd/s/<hash>"
    key: str  # checkpoint key, e.g. "default/mypod/main"
    store: str = ""
    interval_s: float = 0.0  # 0: no periodic checkpoints
    checkpoint_on_stop: bool = False
    keep: int = 0
    shim_pid: int = 0
    task_pid: int = 0
    last_checkpoint: LastCheckpoint | None = None
    last_error: str | None = None
    # The Kubernetes pod the container belongs to (from CRI's annotations; empty outside Kubernetes).
    pod: str = ""
    pod_namespace: str = ""
    container: str = ""
    # Fields written by a newer shim that this version does not know, kept so a rewrite loses nothing.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.last_checkpoint, dict):  # accept the JSON shape from callers too
            self.last_checkpoint = LastCheckpoint.from_dict(self.last_checkpoint)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskRecord:
        """Build a record from its JSON object; raises ValueError on missing or mistyped fields."""
        if not isinstance(data, dict):
            raise ValueError(f"record is a {type(data).__name__}, not an object")
        known = {f.name for f in fields(cls)} - {"extra"}
        missing = [name for name in ("namespace", "id", "address", "key") if not data.get(name)]
        if missing:
            raise ValueError(f"record lacks {', '.join(missing)}")
        try:
            last = data.get("last_checkpoint")
            return cls(
                namespace=str(data["namespace"]),
                id=str(data["id"]),
                address=str(data["address"]),
                key=str(data["key"]),
                store=str(data.get("store") or ""),
                interval_s=float(data.get("interval_s") or 0.0),
                checkpoint_on_stop=bool(data.get("checkpoint_on_stop", False)),
                keep=int(data.get("keep") or 0),
                shim_pid=int(data.get("shim_pid") or 0),
                task_pid=int(data.get("task_pid") or 0),
                last_checkpoint=LastCheckpoint.from_dict(last) if last else None,
                last_error=None if data.get("last_error") is None else str(data["last_error"]),
                pod=str(data.get("pod") or ""),
                pod_namespace=str(data.get("pod_namespace") or ""),
                container=str(data.get("container") or ""),
                extra={k: v for k, v in data.items() if k not in known},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed record: {exc!r}") from exc

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        for name in KUBERNETES_FIELDS:  # only a Kubernetes container's record carries them
            if not data[name]:
                del data[name]
        return {**extra, **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def exited(self) -> bool:
        """The task ended (the record stays until containerd deletes it, e.g. a kubelet keeps an
        exited container for its logs): nothing left to checkpoint."""
        return bool(self.extra.get("exited_at"))

    @property
    def ref(self) -> str:
        """ "namespace/id", how logs and tables name a task."""
        return f"{self.namespace}/{self.id}"


def is_live(record: TaskRecord) -> bool:
    """Whether the record's task may still run: its shim lives, and its task neither exited (the
    shim writes exited_at) nor vanished. A Delete removes the record, so most stale ones never get here."""
    if record.exited:
        return False
    return pid_alive(record.shim_pid) and (record.task_pid == 0 or pid_alive(record.task_pid))


def _check_identifier(kind: str, value: str) -> None:
    if not _IDENTIFIER.match(value or ""):
        raise ValueError(f"invalid {kind} {value!r} for the task registry")


def task_path(run_dir: str | os.PathLike[str], namespace: str, id: str) -> Path:
    _check_identifier("namespace", namespace)
    _check_identifier("container id", id)
    return Path(run_dir) / "tasks" / namespace / f"{id}.json"


def write_task(run_dir: str | os.PathLike[str], record: TaskRecord) -> Path:
    """Write (or replace) a task's record atomically: readers see the old or the new file, never a mix."""
    path = task_path(run_dir, record.namespace, record.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A dot-prefixed name that does not end in .json: list_tasks never picks up a temporary file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{record.id}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(record.to_json())
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def remove_task(run_dir: str | os.PathLike[str], namespace: str, id: str) -> bool:
    """Remove a task's record; True if it existed. Removing a missing record is not an error."""
    try:
        task_path(run_dir, namespace, id).unlink()
        return True
    except FileNotFoundError:
        return False


def read_task(path: Path) -> TaskRecord | None:
    """One record, or None (with a warning) if it vanished, is half-written or malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        log.warning("registry: %s vanished while listing (task deleted?), skipping it", path)
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("registry: cannot read %s: %s; skipping it", path, exc)
        return None
    try:
        record = TaskRecord.from_dict(json.loads(text))
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        log.warning("registry: %s is half-written or malformed (%s); skipping it", path, exc)
        return None
    expected = (path.parent.name, path.name.removesuffix(".json"))
    if (record.namespace, record.id) != expected:
        # Acting on it could checkpoint a task other than the one this file stands for.
        log.warning("registry: %s names task %s, not %s/%s; skipping it", path, record.ref, *expected)
        return None
    return record


def list_tasks(run_dir: str | os.PathLike[str]) -> list[TaskRecord]:
    """Every readable record under `run_dir`, sorted by namespace and id. Never raises for bad files."""
    root = Path(run_dir) / "tasks"
    records: list[TaskRecord] = []
    try:
        namespaces = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("registry: cannot list %s: %s", root, exc)
        return []
    for ns_dir in namespaces:
        try:
            names = sorted(ns_dir.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            log.warning("registry: cannot list %s: %s", ns_dir, exc)
            continue
        for path in names:
            if path.name.startswith(".") or path.suffix != ".json":
                continue
            record = read_task(path)
            if record is not None:
                records.append(record)
    return records
