"""Who used the machine's CPU during a span, and how long one process's threads waited for a core.

A put that gets fewer cores than another of the same bytes at the same load either waits on something
of its own (locks, the server) or on the run queue: /proc/<pid>/task/<tid>/schedstat tells the two
apart (ns on a CPU, ns runnable but waiting for one, timeslices), and a machine-wide diff of every
process's CPU says who held the cores meanwhile. Used by bench/shim_put_watch.py (the shim's put) and
bench/s3_put_profile.py (the bare put), so both report the same figures.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Proc:
    label: str
    cpu_s: float  # user + system of all its threads, ended ones included
    children_s: float = 0.0  # of its reaped children: short-lived processes show up in their parent


def _label(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"
    words = [os.path.basename(w.decode(errors="replace")) for w in argv[:3] if w]
    if words and words[0].startswith("python") and len(words) > 1:
        words = words[1:]
    return " ".join(words)[:60] or f"[{comm}]"


def _proc_cpu(pid: int) -> tuple[float, float] | None:
    """(own, reaped children's) CPU seconds."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(f[11]) + int(f[12])) / TICK, (int(f[13]) + int(f[14])) / TICK


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _is_mine(pid: int, roots: frozenset[int]) -> bool:
    """pid is one of roots or descends from one (this bench's own processes, not the other tenants')."""
    for _ in range(64):
        if pid in roots:
            return True
        if pid <= 1:
            return False
        pid = _parent(pid)
    return False


def _proc(pid: int, cpu: tuple[float, float], roots: frozenset[int]) -> Proc:
    return Proc(("* " if _is_mine(pid, roots) else "") + _label(pid), *cpu)


def snapshot(roots: frozenset[int] = frozenset()) -> dict[int, Proc]:
    """Every process's CPU seconds now; labels of processes in the trees under roots start with '* '."""
    out: dict[int, Proc] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (cpu := _proc_cpu(int(name))) is not None:
            out[int(name)] = _proc(int(name), cpu, roots)
    return out


def machine_diff(before: dict[int, Proc], after: dict[int, Proc], top: int = 16) -> list[tuple[str, float]]:
    """CPU seconds per label between two snapshots (processes that ended in between are not seen)."""
    by: dict[str, float] = {}
    for pid, p in after.items():
        b = before.get(pid)
        used = p.cpu_s - (b.cpu_s if b else 0.0)
        if used > 0:
            by[p.label] = by.get(p.label, 0.0) + used
        reaped = p.children_s - (b.children_s if b else 0.0)
        if reaped > 0 and b is not None:  # a new process's figure may hold children from before the span
            by[f"{p.label} (reaped children)"] = by.get(f"{p.label} (reaped children)", 0.0) + reaped
    rows = sorted(by.items(), key=lambda kv: -kv[1])
    mine = sum(v for k, v in by.items() if k.startswith("* "))
    total = sum(by.values())
    return [("(all seen)", total), ("(* this bench's processes)", mine), ("(other tenants)", total - mine), *rows[:top]]


def stat_fields(pid: int | str) -> dict[str, float]:
    """One process's minor/major faults and user/system CPU seconds (all its threads, live and ended)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return {}
    return {"minflt": int(f[7]), "majflt": int(f[9]), "user_s": int(f[11]) / TICK, "sys_s": int(f[12]) / TICK}


def cpu_ticks() -> list[int]:
    """/proc/stat's first line: user nice system idle iowait irq softirq steal (ticks, all CPUs)."""
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


class Census:
    """Samples every process's CPU (and one process's threads) twice a second over a span, so processes and
    threads that end before it does still count up to their last sample; labels are those first seen."""

    def __init__(self, pid: int | None = None, roots: set[int] | None = None, period: float = 0.5) -> None:
        self.pid, self.period = pid, period
        self.roots = frozenset(roots or ()) | ({pid} if pid is not None else set())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-census", daemon=True)

    def start(self) -> Census:
        self.t0, self.ticks0 = time.monotonic(), cpu_ticks()
        self.before = snapshot(self.roots)
        self.latest = dict(self.before)
        self.threads0 = threads(self.pid) if self.pid is not None else {}
        self.threads_latest = dict(self.threads0)
        self.stat0 = stat_fields(self.pid) if self.pid is not None else {}
        self.stat_latest = dict(self.stat0)
        self._thread.start()
        return self

    def _sample(self) -> None:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            cpu = _proc_cpu(pid)
            if cpu is None:
                continue
            known = self.latest.get(pid)
            self.latest[pid] = Proc(known.label, *cpu) if known else _proc(pid, cpu, self.roots)
        if self.pid is not None:
            self.threads_latest.update(threads(self.pid))
            self.stat_latest = stat_fields(self.pid) or self.stat_latest

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def stop(self) -> str:
        self._stop.set()
        self._thread.join()
        self._sample()
        wall = time.monotonic() - self.t0
        ticks = [b - a for a, b in zip(self.ticks0, cpu_ticks(), strict=True)]
        total = sum(ticks) or 1
        busy = (total - ticks[3] - ticks[4]) / TICK
        lines = [
            f"wall {wall:.2f} s; all CPUs: {busy:.2f} CPU-s busy ({busy / wall:.2f} of {os.cpu_count()} cores), "
            f"idle {100 * ticks[3] / total:.0f} %, iowait {100 * ticks[4] / total:.0f} %, "
            f"steal {100 * ticks[7] / total:.0f} %, load {os.getloadavg()[0]:.1f}; CPU-s by process:"
        ]
        lines += [f"  {cpu:7.2f}  {name}" for name, cpu in machine_diff(self.before, self.latest)]
        if self.pid is not None:
            own = threads_diff(self.threads0, self.threads_latest)
            lines.append(
                f"  process {self.pid} ({cgroups(self.pid)}): {own['cpu_s']:.2f} CPU-s, {own['runq_wait_s']:.2f} s "
                f"runnable but waiting for a core, {own['timeslices']} timeslices, {own['threads_ran']} of "
                f"{own['threads']} threads ran, (policy, nice) {own['policies']}"
            )
            d = {k: self.stat_latest[k] - self.stat0[k] for k in self.stat0}
            lines.append(
                f"  process {self.pid}: user {d['user_s']:.2f} s, system {d['sys_s']:.2f} s, "
                f"{d['minflt']:.0f} minor / {d['majflt']:.0f} major faults"
            )
            lines += threads_by_name(self.threads0, self.threads_latest)
        return "\n".join(lines)


@dataclass
class ThreadStat:
    name: str
    policy: int  # 0 SCHED_OTHER, 3 SCHED_BATCH, 5 SCHED_IDLE
    nice: int
    run_ns: int
    wait_ns: int  # runnable, waiting for a CPU
    slices: int


def threads(pid: int | str = "self") -> dict[int, ThreadStat]:
    out: dict[int, ThreadStat] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        try:
            comm = Path(f"{base}/comm").read_text().strip()
            fields = Path(f"{base}/stat").read_text().rsplit(")", 1)[1].split()
            run, wait, slices = (int(x) for x in Path(f"{base}/schedstat").read_text().split())
        except (OSError, ValueError):
            continue
        out[int(tid)] = ThreadStat(comm, int(fields[38]), int(fields[16]), run, wait, slices)
    return out


def threads_diff(before: dict[int, ThreadStat], after: dict[int, ThreadStat]) -> dict[str, float]:
    """Summed over the threads: CPU s, run-queue wait s, timeslices, and how many threads ran at all."""
    run = wait = 0
    slices = active = 0
    policies: set[tuple[int, int]] = set()
    for tid, t in after.items():
        b = before.get(tid)
        r, w, s = (
            (t.run_ns - b.run_ns, t.wait_ns - b.wait_ns, t.slices - b.slices) if b else (t.run_ns, t.wait_ns, t.slices)
        )
        run, wait, slices = run + r, wait + w, slices + s
        active += r > 0
        policies.add((t.policy, t.nice))
    return {
        "cpu_s": run / 1e9, "runq_wait_s": wait / 1e9, "timeslices": slices, "threads": len(after),
        "threads_ran": active, "policies": sorted(policies),
    }  # fmt: skip


def threads_by_name(before: dict[int, ThreadStat], after: dict[int, ThreadStat]) -> list[str]:
    """Per thread name (digits dropped: a pool's workers together): count, CPU s, run-queue wait s."""
    by: dict[str, list[float]] = {}
    for tid, t in after.items():
        b = before.get(tid)
        r, w = (t.run_ns - b.run_ns, t.wait_ns - b.wait_ns) if b else (t.run_ns, t.wait_ns)
        key = "".join(c for c in t.name if not c.isdigit()) + f" (policy {t.policy}, nice {t.nice})"
        row = by.setdefault(key, [0, 0.0, 0.0])
        row[0] += 1
        row[1] += r / 1e9
        row[2] += w / 1e9
    rows = sorted(by.items(), key=lambda kv: -kv[1][1])
    return [f"  {n:3.0f} x {name}: {cpu:.2f} CPU-s, {wait:.2f} s waiting for a core" for name, (n, cpu, wait) in rows]


def cgroups(pid: int | str = "self") -> str:
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().split()
    except OSError:
        return "?"
    return ",".join(line.split(":", 1)[1] for line in lines if ":cpu" in line or line.startswith("0::"))
