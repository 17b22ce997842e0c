"""A rehearsal of spot losses before the real run: start a job under revenant, interrupt it N times at
random moments (a final checkpoint, the container destroyed, the same container created again, as a
replacement node would), and say for each interruption whether the job resumed, how long it was frozen
and took to come back, how big its checkpoint was, and in plain words why it did not resume.

Docker (the CLI), plain containerd (ctr) and testcontainers (the pytest plugin) drive the containers
through the `Engine` protocol; the shim does the real work (protection annotations, its registry, its
Control service), exactly as on a spot node.
"""

from __future__ import annotations

import logging
import random
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from shim.agent.drain import OK, checkpoint_task
from shim.protect.registry import TaskRecord, list_tasks

log = logging.getLogger(__name__)

RUNTIME = "io.containerd.revenant.v1"
KEY_ANNOTATION = "revenant.io/checkpoint-key"
STORE_ANNOTATION = "revenant.io/store"
INTERVAL_ANNOTATION = "revenant.io/checkpoint-interval"

# CRIU's (and the shim's) words for why a container cannot move, mapped to what a user can act on.
_REASONS: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(r"TCP|tcp-established|sk-inet", re.IGNORECASE),
        "the job holds an open TCP connection to a peer outside the container; a connection cannot move "
        "to another machine (reconnect on failure, or keep the peer inside the container)",
    ),
    (
        re.compile(r"inotify|fanotify|fsnotify", re.IGNORECASE),
        "the job watches files with inotify/fanotify, whose watches CRIU cannot always carry over "
        "(watch from a helper outside the job, or poll)",
    ),
    (
        re.compile(r"\bdevice\b|/dev/|char(acter)? dev|\(chr \d+:\d+\)|tty|unsupported mapping", re.IGNORECASE),
        "the job has a device open (a /dev node, a terminal or a device mapping) that cannot be moved",
    ),
    (
        re.compile(r"unix socket|sk-unix|ext-unix-sk|external unix", re.IGNORECASE),
        "the job is connected to a Unix socket outside the container",
    ),
    (
        re.compile(r"image differs|changed image|differs from the checkpoint", re.IGNORECASE),
        "the image changed since the checkpoint was taken, so the job started fresh instead of resuming "
        "old memory on new binaries",
    ),
    (
        re.compile(r"bad size|has changed|file .* (is )?missing|No such file", re.IGNORECASE),
        "a file the job had open changed or vanished between checkpoint and restore",
    ),
]


def explain(detail: str) -> str:
    """Plain words for a checkpoint or restore failure (CRIU's own line stays in `detail`)."""
    for pattern, words in _REASONS:
        if pattern.search(detail):
            return words
    return detail.strip().splitlines()[-1] if detail.strip() else "unknown reason (see the shim log)"


class Engine(Protocol):
    """What a rehearsal needs of a container engine."""

    namespace: str  # the containerd namespace its containers live in

    def run(self, name: str, image: str, annotations: dict[str, str], command: Sequence[str]) -> str:
        """Start a container with revenant's runtime; returns its containerd id."""
        ...

    def exec(self, cid: str, argv: Sequence[str]) -> tuple[int, str]: ...

    def running(self, cid: str) -> bool: ...

    def remove(self, cid: str) -> None: ...


def _run(argv: Sequence[str], timeout: float = 120, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env)
    return res.returncode, res.stdout, res.stderr


class EngineError(RuntimeError):
    pass


@dataclass
class DockerEngine:
    """The docker CLI (DOCKER_HOST or --host chooses the daemon)."""

    docker: str = "docker"
    host: str | None = None
    run_args: Sequence[str] = ("--network", "none")
    env: dict[str, str] | None = None
    namespace: str = "moby"

    def _cmd(self, *args: str) -> list[str]:
        return [self.docker, *(["-H", self.host] if self.host else []), *args]

    def run(self, name: str, image: str, annotations: dict[str, str], command: Sequence[str]) -> str:
        flags = [f for k, v in annotations.items() for f in ("--annotation", f"{k}={v}")]
        rc, out, err = _run(
            self._cmd("run", "-d", "--name", name, "--runtime", RUNTIME, *self.run_args, *flags, image, *command),
            env=self.env,
        )
        if rc != 0:
            raise EngineError(f"docker run failed: {err.strip() or out.strip()}")
        return out.strip().splitlines()[-1]

    def exec(self, cid: str, argv: Sequence[str]) -> tuple[int, str]:
        rc, out, err = _run(self._cmd("exec", cid, *argv), env=self.env)
        return rc, out + err

    def running(self, cid: str) -> bool:
        rc, out, _ = _run(self._cmd("inspect", "-f", "{{.State.Running}}", cid), env=self.env)
        return rc == 0 and out.strip() == "true"

    def remove(self, cid: str) -> None:
        _run(self._cmd("rm", "-f", cid), env=self.env)


@dataclass
class ContainerdEngine:
    """Plain containerd through ctr: the image must be in the namespace already."""

    address: str = "/run/containerd/containerd.sock"
    namespace: str = "default"
    ctr: str = "ctr"
    env: dict[str, str] | None = None

    def _cmd(self, *args: str) -> list[str]:
        return [self.ctr, "-a", self.address, "-n", self.namespace, *args]

    def run(self, name: str, image: str, annotations: dict[str, str], command: Sequence[str]) -> str:
        flags = [f for k, v in annotations.items() for f in ("--annotation", f"{k}={v}")]
        rc, out, err = _run(self._cmd("run", "-d", "--runtime", RUNTIME, *flags, image, name, *command), env=self.env)
        if rc != 0:
            raise EngineError(f"ctr run failed: {err.strip() or out.strip()}")
        return name

    def exec(self, cid: str, argv: Sequence[str]) -> tuple[int, str]:
        rc, out, err = _run(self._cmd("task", "exec", "--exec-id", f"rehearse-{uuid.uuid4().hex[:8]}", cid, *argv))
        return rc, out + err

    def running(self, cid: str) -> bool:
        rc, out, _ = _run(self._cmd("task", "ls"), env=self.env)
        return rc == 0 and any(ln.split()[:1] == [cid] and ln.split()[-1] == "RUNNING" for ln in out.splitlines())

    def remove(self, cid: str) -> None:
        _run(self._cmd("task", "kill", "-s", "SIGKILL", cid), env=self.env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.running(cid):
            time.sleep(0.2)
        _run(self._cmd("task", "rm", "-f", cid), env=self.env)
        _run(self._cmd("containers", "rm", cid), env=self.env)


@dataclass
class Interruption:
    n: int
    at_s: float  # seconds after the job started
    checkpoint_ok: bool = False
    seq: int | None = None
    freeze_s: float | None = None
    checkpoint_s: float | None = None
    checkpoint_bytes: int | None = None
    uploaded_bytes: int | None = None
    restore_s: float | None = None  # from creating the new container to the job running again
    resumed: bool = False
    health_ok: bool | None = None
    progress_before: float | None = None
    progress_after: float | None = None
    reason: str | None = None  # plain words
    detail: str | None = None  # CRIU's or the shim's own words


@dataclass
class RehearsalReport:
    image: str
    engine: str
    key: str
    store: str
    interruptions: list[Interruption] = field(default_factory=list)
    error: str | None = None  # the rehearsal itself could not run (the job never started, ...)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.interruptions) and all(i.resumed for i in self.interruptions)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def __str__(self) -> str:
        return render(self)


@dataclass
class RehearsalPlan:
    image: str
    command: Sequence[str]
    store: str
    run_dir: Path
    interruptions: int = 3
    min_s: float = 5.0
    max_s: float = 20.0
    seed: int | None = None
    health_cmd: str | None = None  # run with `sh -c` inside the container after each restore
    progress_file: str | None = None  # a path inside the container holding a number that must not go back
    checkpoint_timeout_s: float = 300.0
    restore_timeout_s: float = 120.0
    key: str = field(default_factory=lambda: f"rehearse/{uuid.uuid4().hex[:12]}/main")


class Rehearsal:
    def __init__(
        self, engine: Engine, plan: RehearsalPlan, sleep: Callable[[float], None] = time.sleep, engine_name: str = ""
    ) -> None:
        if plan.interruptions < 1:
            raise ValueError("--interruptions must be at least 1")
        if not 0 <= plan.min_s <= plan.max_s:
            raise ValueError("need 0 <= --min <= --max")
        self.engine = engine
        self.plan = plan
        self.sleep = sleep
        self.engine_name = engine_name or type(engine).__name__
        self.rng = random.Random(plan.seed)
        self._name = f"rehearse-{uuid.uuid4().hex[:8]}"

    def annotations(self) -> dict[str, str]:
        return {KEY_ANNOTATION: self.plan.key, STORE_ANNOTATION: self.plan.store, INTERVAL_ANNOTATION: "off"}

    # -- the registry is how the shim says what it did --------------------------------------------
    def _record(self, cid: str) -> TaskRecord | None:
        for r in list_tasks(self.plan.run_dir):
            if r.id == cid and r.namespace == self.engine.namespace:
                return r
        return None

    def _wait_record(self, cid: str, timeout: float) -> TaskRecord | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = self._record(cid)
            if rec is not None:
                return rec
            if not self.engine.running(cid):
                return self._record(cid)
            time.sleep(0.1)
        return None

    def _progress(self, cid: str, tries: int = 20) -> float | None:
        """The last number in the progress file; a job rewriting it may leave it empty for a moment."""
        if not self.plan.progress_file:
            return None
        for _ in range(tries):
            rc, out = self.engine.exec(cid, ["cat", self.plan.progress_file])
            numbers = re.findall(r"-?\d+(?:\.\d+)?", out) if rc == 0 else []
            if numbers:
                return float(numbers[-1])
            time.sleep(0.1)
        return None

    def _healthy(self, cid: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            rc, _ = self.engine.exec(cid, ["sh", "-c", self.plan.health_cmd or "true"])
            if rc == 0:
                return True
            if time.monotonic() >= deadline or not self.engine.running(cid):
                return False
            time.sleep(0.5)

    # -- the rehearsal -------------------------------------------------------------------------
    def run(self) -> RehearsalReport:
        plan = self.plan
        report = RehearsalReport(plan.image, self.engine_name, plan.key, plan.store)
        cid = ""
        try:
            cid = self.engine.run(f"{self._name}-0", plan.image, self.annotations(), plan.command)
            if self._wait_record(cid, plan.restore_timeout_s) is None:
                report.error = "the job did not start under revenant (no registry record: is the runtime installed?)"
                return report
            started = time.monotonic()
            for n in range(1, plan.interruptions + 1):
                self.sleep(self.rng.uniform(plan.min_s, plan.max_s))
                step = Interruption(n, round(time.monotonic() - started, 3))
                report.interruptions.append(step)
                cid = self._interrupt(cid, step)
                if not step.resumed:
                    break  # a real spot loss would have lost the job here: nothing further to rehearse
            return report
        except Exception as e:  # the engine failed us: say so, keep what was measured
            report.error = f"{type(e).__name__}: {e}"
            return report
        finally:
            if cid:
                self.engine.remove(cid)

    def _interrupt(self, cid: str, step: Interruption) -> str:
        plan = self.plan
        if not self.engine.running(cid):
            step.reason = step.detail = "the job had exited before the interruption"
            return cid
        record = self._record(cid)
        if record is None:
            step.reason = step.detail = "the shim has no registry record of the job"
            return cid
        step.progress_before = self._progress(cid)
        result = checkpoint_task(
            record, exit=True, deadline=time.time() + plan.checkpoint_timeout_s, reason="revenant rehearse"
        )
        if result.status != OK:
            step.detail = result.error or result.status
            step.reason = "checkpoint failed: " + explain(step.detail)
            return cid
        step.checkpoint_ok = True
        step.seq, step.freeze_s, step.checkpoint_s = result.seq, result.freeze_s, result.total_s
        step.checkpoint_bytes, step.uploaded_bytes = result.bytes_read, result.bytes_uploaded
        self.engine.remove(cid)  # the node is gone

        t0 = time.monotonic()
        name = f"{self._name}-{step.n}"
        try:
            cid = self.engine.run(name, plan.image, self.annotations(), plan.command)
        except EngineError as e:  # the replacement did not even start: that is the answer
            step.detail = str(e)
            step.reason = "restore failed: " + explain(step.detail)
            self.engine.remove(name)  # docker keeps a created container by its name
            return ""
        record = self._wait_record(cid, plan.restore_timeout_s)
        step.restore_s = round(time.monotonic() - t0, 3)
        extra = record.extra if record is not None else {}
        if record is None:
            step.detail = "no registry record of the new container: it did not start"
        elif extra.get("restored_from") != step.seq:
            step.detail = str(extra.get("fresh_reason") or f"restored from {extra.get('restored_from')!r}")
        if step.detail is not None:
            step.reason = "restore failed: " + explain(step.detail)
            return cid
        if plan.health_cmd:
            step.health_ok = self._healthy(cid, plan.restore_timeout_s)
            if not step.health_ok:
                step.reason = step.detail = f"the health command failed after the restore: {plan.health_cmd}"
                return cid
        if plan.progress_file:
            step.progress_after = self._progress(cid)
            before, after = step.progress_before, step.progress_after
            if after is None or (before is not None and after < before):
                step.reason = step.detail = f"progress went backwards: {plan.progress_file} {before} -> {after}"
                return cid
        if not self.engine.running(cid):
            step.reason = step.detail = "the job exited right after the restore"
            return cid
        step.resumed = True
        return cid


def _fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}s"


def render(report: RehearsalReport) -> str:
    from .fmt import human_size
    from .protect import table

    rows = []
    for i in report.interruptions:
        rows.append(
            (
                str(i.n),
                f"{i.at_s:.1f}s",
                f"ok #{i.seq}" if i.checkpoint_ok else "FAILED",
                _fmt_s(i.freeze_s),
                human_size(i.checkpoint_bytes) if i.checkpoint_bytes is not None else "-",
                _fmt_s(i.restore_s),
                "yes" if i.resumed else "NO",
                i.reason or "",
            )
        )
    lines = [
        f"rehearsal of {report.image} on {report.engine}: key {report.key}, store {report.store}",
        table(("#", "AT", "CHECKPOINT", "FROZEN", "SIZE", "RESTORE", "RESUMED", "WHY NOT"), rows),
    ]
    for i in report.interruptions:
        if i.detail and i.detail != i.reason:
            lines.append(f"  #{i.n}: {i.detail}")
    if report.error:
        lines.append(f"rehearsal failed: {report.error}")
    resumed = sum(1 for i in report.interruptions if i.resumed)
    lines.append(f"{resumed}/{len(report.interruptions)} interruptions resumed: {'OK' if report.ok else 'NOT OK'}")
    return "\n".join(lines)
