"""One container of the shim and its lifecycle: rootfs mounts, runc create/start/delete, pause/resume,
exec start, the restore at Start (with the fallback over the lifecycle hooks' restore plans) and the
cleanup after a failed create or restore.

Errors are shim.errors kinds. A runc failure travels as a plain RevenantError (Unknown) with runc's
own text, as containerd's runc shim does; signalling a finished process is NotFound.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from revenant_pb.containerd.task.v2 import shim_pb2 as api
from shim.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, RevenantError, Unimplemented
from shim.runc.driver import IOFds, Runc, RuncError, Runner
from shim.runc.freezer import CgroupFreezer, container_freezer
from shim.task import mounts, runtime_options
from shim.task.exits import ExitRegistry
from shim.task.hooks import LifecycleHooks, RestorePlan
from shim.task.oom import OOMWatcher
from shim.task.process import Process, State
from shim.task.stdio import ProcessIO

log = logging.getLogger(__name__)


def runc_failed(e: RuncError) -> RevenantError:
    """Like Go shims: a plain error travels as Unknown with runc's own text."""
    return RevenantError(str(e))


class CheckpointBackend(Protocol):
    """What a checkpoint implementation provides; the task layer owns locking, states and events.

    Inside the shim every child must be started through the subreaper (`container.runc`, whose runner
    is Reaper.run, or Reaper.spawn/wait_command): a plain subprocess.run would race the reaper's
    wait(-1) and see exit status 0 for a runc/CRIU that failed. A restored init's pid must come back
    from restore_start so its exit is matched. Failures raise shim.errors kinds."""

    def checkpoint(self, container: Container, request: api.CheckpointTaskRequest) -> None: ...

    def restore_create(
        self, container: Container, request: api.CreateTaskRequest, io: IOFds, console_socket: str | None
    ) -> None:
        """Prepare a restore at Create from container.checkpoint (the task starts from it at Start)."""

    def restore_start(self, container: Container) -> int:
        """Restore container.checkpoint; returns the restored init pid."""
        ...


@dataclass
class TaskRuntime:
    """What every container of one shim shares."""

    namespace: str
    exits: ExitRegistry  # its on_exit reports an exit (TaskExit); early exits are reported through it too
    oom: OOMWatcher
    hooks: LifecycleHooks
    backend: CheckpointBackend | None  # None: this shim cannot checkpoint or restore
    runner: Runner  # how runc is run: through the subreaper inside the shim


@dataclass(eq=False)
class Container:
    id: str
    bundle: str
    namespace: str
    runc: Runc
    options: runtime_options.RuntimeOptions
    init: Process
    runtime: TaskRuntime
    rootfs_mounted: bool = False
    rootfs: list[mounts.Mount] = field(default_factory=list)
    restore_plan: RestorePlan | None = None  # set when the task is created from a checkpoint
    checkpoint: str = ""  # the CRIU images a restore at Start uses (the checkpoint backend reads it)
    console_socket: str | None = None  # a terminal's console socket, kept for a restore at Start
    execs: dict[str, Process] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # execs
    _checkpoint_freezer: CgroupFreezer | None = field(default=None, repr=False)  # what froze it for a checkpoint

    @classmethod
    def new(cls, req: api.CreateTaskRequest, runtime: TaskRuntime) -> Container:
        """The container a CreateTaskRequest describes; nothing is created or mounted yet."""
        if not req.id:
            raise InvalidArgument("CreateTaskRequest.id is empty")
        bundle = req.bundle or os.getcwd()
        try:
            opts = runtime_options.from_request(
                req.options if req.HasField("options") else None, bundle, runtime.namespace
            )
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        os.makedirs(opts.root, mode=0o711, exist_ok=True)
        runc = Runc(
            root=opts.root,
            log_path=os.path.join(bundle, "log.json"),
            binary=opts.binary,
            systemd_cgroup=opts.systemd_cgroup,
            runner=runtime.runner,
        )
        init = Process(
            container_id=req.id,
            exec_id="",
            bundle=bundle,
            stdin=req.stdin,
            stdout=req.stdout,
            stderr=req.stderr,
            terminal=req.terminal,
        )
        return cls(req.id, bundle, runtime.namespace, runc, opts, init, runtime)

    # -- what lifecycle hooks see (hooks.ContainerControl) -----------------------------------------
    @property
    def init_pid(self) -> int:
        return self.init.pid

    def pause_for_checkpoint(self) -> bool:
        """Freeze a running task for a protective checkpoint; a task the user paused stays as it is.

        The cgroup freezer is written directly (milliseconds, shim.runc.freezer); `runc pause` only
        where runc's state does not name a usable freezer or the direct freeze failed."""
        if self.init.state is not State.RUNNING:
            return False
        freezer = container_freezer(self.runc.root, self.id)
        if freezer is not None:
            try:
                freezer.freeze()
            except OSError as e:
                log.warning("%s: freezing cgroup %s failed (%s); using runc pause", self.id, freezer.path, e)
                freezer = None
        if freezer is None:
            self.runc.pause(self.id)
        self._checkpoint_freezer = freezer
        return True

    def resume_after_checkpoint(self) -> None:
        freezer, self._checkpoint_freezer = self._checkpoint_freezer, None
        if freezer is not None:
            try:
                freezer.thaw()
                return
            except OSError as e:
                log.warning("%s: thawing cgroup %s failed (%s); using runc resume", self.id, freezer.path, e)
        self.runc.resume(self.id)

    # -- processes -------------------------------------------------------------------------------
    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        with self._lock:
            proc = self.execs.get(exec_id)
        if proc is None:
            raise NotFound(f"exec {exec_id} not found in {self.id}")
        return proc

    def add_exec(self, req: api.ExecProcessRequest) -> Process:
        if not req.exec_id:
            raise InvalidArgument("ExecProcessRequest.exec_id is empty")
        self.init.check("exec")
        proc = Process(
            container_id=self.id,
            exec_id=req.exec_id,
            bundle=self.bundle,
            stdin=req.stdin,
            stdout=req.stdout,
            stderr=req.stderr,
            terminal=req.terminal,
            spec=req.spec.value,
        )
        proc.io = ProcessIO(self.id, self.namespace, req.stdin, req.stdout, req.stderr, req.terminal)
        with self._lock:
            if req.exec_id in self.execs:
                raise AlreadyExists(f"exec {req.exec_id} already exists in {self.id}")
            self.execs[req.exec_id] = proc
        return proc

    # -- create ----------------------------------------------------------------------------------
    def create(self, req: api.CreateTaskRequest) -> None:
        """Mount the rootfs and create the init (or prepare its restore). On failure the caller runs
        cleanup_failed_create."""
        self.options.save(self.bundle)
        self.rootfs = [mounts.Mount(m.type, m.source, tuple(m.options)) for m in req.rootfs]
        # Before the rootfs is mounted: a checkpoint's writable layer may fill its upper dir.
        plan = self.runtime.hooks.before_create(self, req.checkpoint)
        if req.checkpoint:
            plan = RestorePlan(req.checkpoint)  # containerd's own checkpoint wins, without fallback
        if self.rootfs:
            self.mount_rootfs()
        init = self.init
        init.io = ProcessIO(self.id, self.namespace, init.stdin, init.stdout, init.stderr, init.terminal)
        console_socket = init.io.prepare()
        if plan is not None:
            if self.runtime.backend is None:
                raise Unimplemented("creating a task from a checkpoint needs the checkpoint engine")
            self.restore_plan, self.checkpoint = plan, plan.checkpoint_dir
            self.runtime.backend.restore_create(self, req, init.io.fds, console_socket)
            self.console_socket = console_socket
            return
        self._runc_create(console_socket)

    def mount_rootfs(self) -> None:
        rootfs = os.path.join(self.bundle, "rootfs")
        os.makedirs(rootfs, mode=0o711, exist_ok=True)
        mounts.mount_all(self.rootfs, rootfs)
        self.rootfs_mounted = True

    def unmount_rootfs(self) -> None:
        if self.rootfs_mounted:
            mounts.unmount_all(os.path.join(self.bundle, "rootfs"))
            self.rootfs_mounted = False

    def _runc_create(self, console_socket: str | None) -> None:
        init = self.init
        assert init.io is not None
        pid_file = os.path.join(self.bundle, "init.pid")
        try:
            self.runc.create(
                self.id,
                self.bundle,
                pid_file,
                init.io.fds,
                console_socket=console_socket,
                no_pivot=self.options.no_pivot_root,
                no_new_keyring=self.options.no_new_keyring,
            )
        except RuncError as e:
            raise runc_failed(e) from None
        init.io.after_start()
        init.pid = _read_pid(pid_file)
        self._register_init(init)

    def _register_init(self, init: Process) -> None:
        """Register the init's pid: report an exit already seen, else watch it for OOM kills."""
        early = self.runtime.exits.register(init.pid, init)
        if early is not None:
            self.runtime.exits.on_exit(init, early)
        else:
            self.runtime.oom.add(self.id, init.pid)  # before Start: it cannot run out of memory before it runs

    def cleanup_failed_create(self) -> None:
        self.runtime.hooks.deleted(self)
        if self.init.io is not None:
            self.init.io.close()
        with contextlib.suppress(RuncError):
            self.runc.delete(self.id, force=True)
        self.unmount_rootfs()

    # -- start -----------------------------------------------------------------------------------
    def start(self, proc: Process) -> int | None:
        """Start the init (or restore it) or an exec; returns an exit status the reaper already saw
        for it, which the caller reports after its start event."""
        if not proc.is_init:
            return self._start_exec(proc)
        if self.restore_plan is not None:
            return self._start_from_checkpoint(self.restore_plan)
        try:
            self.runc.start(self.id)
        except RuncError as e:
            raise runc_failed(e) from None
        return None

    def started(self) -> None:
        """The init runs and its start is published: tell the hooks."""
        self.runtime.hooks.started(self)

    def _start_from_checkpoint(self, plan: RestorePlan | None) -> int | None:
        """runc restore; a plan that may fall back tries the hooks' next plans, then a fresh start."""
        backend = self.runtime.backend
        assert backend is not None
        while plan is not None:
            self.restore_plan, self.checkpoint = plan, plan.checkpoint_dir
            try:
                pid = backend.restore_start(self)
            except RevenantError as e:
                if not plan.fall_back:
                    self._cleanup_failed_restore()
                    raise
                plan = self._next_plan(e)
                continue
            self.init.pid = pid
            early = self.runtime.exits.register(pid, self.init)
            if early is None:
                self.runtime.oom.add(self.id, pid)
            return early
        # No checkpoint left that restores: the task starts from its image, as if never checkpointed.
        self.restore_plan, self.checkpoint = None, ""
        self._runc_create(self.console_socket)
        if self.init.exit is not None:
            return None
        try:
            self.runc.start(self.id)
        except RuncError as e:
            raise runc_failed(e) from None
        return None

    def _next_plan(self, error: Exception) -> RestorePlan | None:
        """Ask the hooks for the next plan with the rootfs unmounted (they may refill its upper dir)."""
        self.unmount_rootfs()
        try:
            return self.runtime.hooks.restore_failed(self, error)
        finally:
            if self.rootfs:
                self.mount_rootfs()

    def _cleanup_failed_restore(self) -> None:
        """A restore that failed leaves the task CREATED for containerd to delete; whatever runc and
        CRIU half-built (restored processes, runc state, cgroups) and the rootfs mount go now."""
        with contextlib.suppress(RuncError):
            self.runc.delete(self.id, force=True)
        try:
            self.unmount_rootfs()
        except OSError as e:
            log.warning("cannot unmount the rootfs of %s after its failed restore: %s", self.id, e)

    def _start_exec(self, proc: Process) -> int | None:
        if self.init.state is not State.RUNNING:
            raise FailedPrecondition(f"cannot start exec {proc.exec_id}: task {self.id} is {self.init.state.value}")
        spec_path = os.path.join(self.bundle, f"exec-{proc.exec_id}.json")
        pid_file = os.path.join(self.bundle, f"exec-{proc.exec_id}.pid")
        assert proc.io is not None
        with open(spec_path, "wb") as f:
            f.write(proc.spec)
        console_socket = proc.io.prepare()
        try:
            self.runc.exec(self.id, spec_path, pid_file, proc.io.fds, console_socket=console_socket)
            proc.io.after_start()
        except RuncError as e:
            proc.io.close()
            raise runc_failed(e) from None
        except BaseException:
            proc.io.close()
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(spec_path)
        proc.pid = _read_pid(pid_file)
        with contextlib.suppress(OSError):
            os.unlink(pid_file)
        return self.runtime.exits.register(proc.pid, proc)

    # -- delete ----------------------------------------------------------------------------------
    def delete(self, proc: Process) -> None:
        """Delete a stopped (or never started) process; the init takes the container with it."""
        proc.check("delete")
        if proc.is_init:
            self._delete_init()
        else:
            with self._lock:
                self.execs.pop(proc.exec_id, None)
            self.runtime.exits.forget(proc.pid)
        if proc.io is not None:
            proc.io.close()
        proc.advance("delete")

    def _delete_init(self) -> None:
        try:
            self.runc.delete(self.id, force=True)
        except RuncError as e:
            if not e.not_found:
                raise runc_failed(e) from None
        self.unmount_rootfs()
        self.runtime.hooks.deleted(self)
        with self._lock:
            execs = list(self.execs.values())
        for ex in execs:
            if ex.io is not None:
                ex.io.close()
        self.runtime.oom.remove(self.id)
        self.runtime.exits.forget(self.init.pid)

    # -- running task ----------------------------------------------------------------------------
    def pause(self) -> None:
        self.init.check("pause")
        try:
            self.runc.pause(self.id)
        except RuncError as e:
            raise runc_failed(e) from None
        self.init.advance("pause")

    def resume(self) -> None:
        self.init.check("resume")
        try:
            self.runc.resume(self.id)
        except RuncError as e:
            raise runc_failed(e) from None
        self.init.advance("resume")

    def kill(self, proc: Process, signal: int, all_processes: bool, final_checkpoint: bool = True) -> None:
        """final_checkpoint=False: the signal goes to runc without the stop hook (a second signal
        while the first still takes the final checkpoint)."""
        # No process lock: a kill must get through while Start or an exit holds it.
        proc.check("kill")
        if proc.is_init and final_checkpoint and self.runtime.hooks.before_kill(self, signal):
            return  # the final checkpoint stopped the task; its exit follows
        if proc.is_init:
            try:
                self.runc.kill(self.id, signal, all_processes=all_processes)
            except RuncError as e:
                if proc.exit is not None:
                    raise NotFound(f"{proc.name}: process already finished") from None
                raise runc_failed(e) from None
            return
        if not proc.pid:
            raise FailedPrecondition(f"cannot kill {proc.name}: it was never started")
        try:
            os.kill(proc.pid, signal)
        except ProcessLookupError:
            raise NotFound(f"{proc.name}: process already finished") from None

    def pids(self) -> list[tuple[int, str]]:
        """(pid, exec id) of every process in the container; "" for a process that is not an exec."""
        self.init.check("pids")
        try:
            pids = self.runc.ps(self.id)
        except RuncError as e:
            raise runc_failed(e) from None
        with self._lock:
            exec_by_pid = {p.pid: p.exec_id for p in self.execs.values() if p.pid}
        return [(pid, exec_by_pid.get(pid, "")) for pid in pids]

    def update(self, resources: bytes) -> None:
        self.init.check("update")
        if not resources:
            raise InvalidArgument("UpdateTaskRequest.resources is empty")
        try:
            self.runc.update(self.id, resources)
        except RuncError as e:
            raise runc_failed(e) from None

    def stats(self) -> dict[str, Any]:
        """runc's stats of the container (`runc events --stats`)."""
        self.init.check("stats")
        try:
            return self.runc.stats(self.id)
        except RuncError as e:
            raise runc_failed(e) from None

    def checkpoint_task(self, req: api.CheckpointTaskRequest) -> None:
        if self.runtime.backend is None:
            raise Unimplemented("checkpoint is not implemented by this shim yet")
        with self.init.lock:
            self.init.check("checkpoint")
            self.runtime.backend.checkpoint(self, req)

    def resize_pty(self, exec_id: str, width: int, height: int) -> None:
        proc = self.process(exec_id)
        if proc.io is None or not proc.terminal:
            raise FailedPrecondition(f"{proc.name} has no terminal")
        proc.io.resize(width, height)

    def close_io(self, exec_id: str, stdin: bool) -> None:
        proc = self.process(exec_id)
        if stdin and proc.io is not None:
            proc.io.close_stdin()


def _read_pid(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())
