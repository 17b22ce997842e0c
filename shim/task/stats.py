"""`runc events --stats` JSON -> io.containerd.cgroups.v1.Metrics, the type containerd 1.6's
`ctr task metrics` decodes on cgroup v1 / hybrid hosts (this machine)."""

from __future__ import annotations

from typing import Any

from revenant_pb.io.containerd.cgroups.v1 import metrics_pb2

# MemoryStat field -> key in runc's memory "raw" map (the cgroup's memory.stat)
_RAW_KEYS = {
    "pg_pg_in": "pgpgin",
    "pg_pg_out": "pgpgout",
    "pg_fault": "pgfault",
    "pg_maj_fault": "pgmajfault",
    "hierarchical_swap_limit": "hierarchical_memsw_limit",
    "total_pg_pg_in": "total_pgpgin",
    "total_pg_pg_out": "total_pgpgout",
    "total_pg_fault": "total_pgfault",
    "total_pg_maj_fault": "total_pgmajfault",
}
_BLKIO = {
    "ioServiceBytesRecursive": "io_service_bytes_recursive",
    "ioServicedRecursive": "io_serviced_recursive",
    "ioQueueRecursive": "io_queued_recursive",
    "ioServiceTimeRecursive": "io_service_time_recursive",
    "ioWaitTimeRecursive": "io_wait_time_recursive",
    "ioMergedRecursive": "io_merged_recursive",
    "ioTimeRecursive": "io_time_recursive",
    "sectorsRecursive": "sectors_recursive",
}


def _entry(src: dict[str, Any] | None, dst: metrics_pb2.MemoryEntry) -> None:
    src = src or {}
    dst.limit, dst.usage = src.get("limit", 0), src.get("usage", 0)
    dst.max, dst.failcnt = src.get("max", 0), src.get("failcnt", 0)


def metrics_from_runc(data: dict[str, Any]) -> metrics_pb2.Metrics:
    m = metrics_pb2.Metrics()
    cpu = data.get("cpu") or {}
    usage = cpu.get("usage") or {}
    m.cpu.usage.total, m.cpu.usage.kernel = usage.get("total", 0), usage.get("kernel", 0)
    m.cpu.usage.user = usage.get("user", 0)
    m.cpu.usage.per_cpu.extend(usage.get("percpu") or [])
    thr = cpu.get("throttling") or {}
    m.cpu.throttling.periods = thr.get("periods", 0)
    m.cpu.throttling.throttled_periods = thr.get("throttled_periods", 0)
    m.cpu.throttling.throttled_time = thr.get("throttled_time", 0)

    mem = data.get("memory") or {}
    raw = mem.get("raw") or {}
    for field in metrics_pb2.MemoryStat.DESCRIPTOR.fields:
        if field.message_type is None:
            setattr(m.memory, field.name, int(raw.get(_RAW_KEYS.get(field.name, field.name), 0)))
    m.memory.cache = mem.get("cache", m.memory.cache)
    _entry(mem.get("usage"), m.memory.usage)
    _entry(mem.get("swap"), m.memory.swap)
    _entry(mem.get("kernel"), m.memory.kernel)
    _entry(mem.get("kernelTCP"), m.memory.kernel_tcp)

    pids = data.get("pids") or {}
    m.pids.current, m.pids.limit = pids.get("current", 0), pids.get("limit", 0)

    for size, h in sorted((data.get("hugetlb") or {}).items()):
        m.hugetlb.add(pagesize=size, usage=h.get("usage", 0), max=h.get("max", 0), failcnt=h.get("failcnt", 0))
    blkio = data.get("blkio") or {}
    for key, field_name in _BLKIO.items():
        for e in blkio.get(key) or []:
            getattr(m.blkio, field_name).add(
                op=e.get("op", ""), major=e.get("major", 0), minor=e.get("minor", 0), value=e.get("value", 0)
            )
    return m
