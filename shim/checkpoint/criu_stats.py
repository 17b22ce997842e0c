"""CRIU's statistics files (`stats-dump`, `stats-restore` in the work directory), as Podman's
`--print-stats` reports them.

Image file layout: u32 magic IMG_SERVICE, u32 magic STATS, then one entry: u32 size + protobuf.
All integers little-endian; CRIU's times are microseconds.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from revenant_pb.criu import stats_pb2

IMG_SERVICE_MAGIC = 0x55105940
STATS_MAGIC = 0x57093306


class StatsFormatError(ValueError):
    pass


@dataclass(frozen=True)
class DumpStats:
    freezing_time_us: int
    frozen_time_us: int
    memdump_time_us: int
    memwrite_time_us: int
    pages_scanned: int
    pages_skipped_parent: int
    pages_written: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class RestoreStats:
    pages_compared: int
    pages_skipped_cow: int
    forking_time_us: int
    restore_time_us: int
    pages_restored: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _read_entry(path: Path) -> stats_pb2.StatsEntry:
    data = path.read_bytes()
    if len(data) < 12:
        raise StatsFormatError(f"{path}: {len(data)} bytes is too short for a CRIU stats image")
    service, magic, size = struct.unpack_from("<III", data)
    if service != IMG_SERVICE_MAGIC or magic != STATS_MAGIC:
        raise StatsFormatError(f"{path}: not a CRIU stats image (magic {service:#x} {magic:#x})")
    if len(data) < 12 + size:
        raise StatsFormatError(f"{path}: entry of {size} bytes is truncated at {len(data) - 12}")
    entry = stats_pb2.StatsEntry()
    entry.ParseFromString(data[12 : 12 + size])
    return entry


def read_dump_stats(work_dir: Path) -> DumpStats | None:
    """The dump statistics CRIU left in `work_dir`, or None when it wrote none."""
    path = work_dir / "stats-dump"
    if not path.exists():
        return None
    d = _read_entry(path).dump
    return DumpStats(
        d.freezing_time,
        d.frozen_time,
        d.memdump_time,
        d.memwrite_time,
        d.pages_scanned,
        d.pages_skipped_parent,
        d.pages_written,
    )


def read_restore_stats(work_dir: Path) -> RestoreStats | None:
    path = work_dir / "stats-restore"
    if not path.exists():
        return None
    r = _read_entry(path).restore
    return RestoreStats(r.pages_compared, r.pages_skipped_cow, r.forking_time, r.restore_time, r.pages_restored)
