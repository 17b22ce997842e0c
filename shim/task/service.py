"""containerd.task.v2.Task over runc: every RPC of the shim v2 task API.

Containers are keyed by id (one shim may serve a whole sandbox group). Process lifecycles live in
shim.task.process; runc is driven through shim.runc.driver; exits come from the subreaper (shim.runc.reaper) and are
matched to processes here. Checkpoint/restore is delegated to a pluggable CheckpointBackend, so adding
one (as the CRIU checkpoint support did) does not change this service.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from google.protobuf import empty_pb2

from revenant_pb.containerd.events import task_pb2 as events
from revenant_pb.containerd.runc.v1 import oci_pb2
from revenant_pb.containerd.task.v2 import shim_pb2 as api
from revenant_pb.containerd.v1.types import task_pb2 as types
from shim.runc.driver import IOFds, Runc, RuncError
from shim.runc.reaper import Reaper
from shim.task import mounts, runtime_options
from shim.task.events import pack_any
from shim.task.oom import OOMWatcher
from shim.task.process import Process, State
from shim.task.stdio import ProcessIO
from shim.ttrpc import (
    AlreadyExists,
    Code,
    Context,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Service,
    TtrpcError,
    Unimplemented,
)
from shim.version import __version__

if TYPE_CHECKING:
    from shim.protect.manager import ProtectionManager

log = logging.getLogger(__name__)

TASK_SERVICE = "containerd.task.v2.Task"
SHIM_SERVICE = "revenant.shim.v1.Shim"
RESERVATION_TTL = 60.0  # a reserved container that containerd never creates stops holding the shim
VERSION = f"revenant-shim {__version__}"
_STATUS = {
    State.CREATED: types.CREATED,
    State.RUNNING: types.RUNNING,
    State.PAUSED: types.PAUSED,
    State.STOPPED: types.STOPPED,
    State.DELETED: types.STOPPED,
}


class EventSink(Protocol):
    def publish(self, event: object) -> None: ...


class CheckpointBackend(Protocol):
    """What a checkpoint implementation provides; the service owns locking, states and events.

    Inside the shim every child must be started through the subreaper (`container.runc`, whose runner
    is Reaper.run, or Reaper.spawn/wait_command): a plain subprocess.run would race the reaper's
    wait(-1) and see exit status 0 for a runc/CRIU that failed. A restored init's pid must come back
    from restore_start so its exit is matched."""

    def checkpoint(self, container: Container, request: api.CheckpointTaskRequest) -> None: ...

    def restore_create(
        self, container: Container, request: api.CreateTaskRequest, io: IOFds, console_socket: str | None
    ) -> None:
        """Prepare a restore at Create (the task starts from request.checkpoint at Start)."""

    def restore_start(self, container: Container) -> int:
        """Restore the checkpoint; returns the restored init pid."""
        ...


@dataclass(eq=False)
class Container:
    id: str
    bundle: str
    namespace: str
    runc: Runc
    options: runtime_options.RuntimeOptions
    init: Process
    rootfs_mounted: bool = False
    rootfs: list[mounts.Mount] = field(default_factory=list)
    checkpoint: str = ""  # set when the task is created from a checkpoint (restore at Start)
    console_socket: str | None = None  # a terminal's console socket, kept for a restore at Start
    execs: dict[str, Process] = field(default_factory=dict)

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise NotFound(f"exec {exec_id} not found in {self.id}") from None


def _runc_failed(e: RuncError) -> TtrpcError:
    # Like Go shims: a plain error travels as Unknown with runc's own text.
    return TtrpcError(str(e), Code.UNKNOWN)


class TaskService:
    def __init__(
        self,
        namespace: str,
        publisher: EventSink,
        reaper: Reaper | None,
        on_shutdown: Callable[[], None],
        checkpoint_engine: CheckpointBackend | None = None,
        linger: float = 0.0,
        log_to_bundle: Callable[[str], None] | None = None,
        protection: ProtectionManager | None = None,
    ) -> None:
        self.namespace = namespace
        self.publisher = publisher
        self.reaper = reaper
        self.on_shutdown = on_shutdown
        self.checkpoint_engine = checkpoint_engine
        self.protection = protection  # revenant's transparent checkpoints (shim.protect.manager)
        self._lock = threading.Lock()  # containers, pid registry
        self.containers: dict[str, Container] = {}
        self._by_pid: dict[int, Process] = {}
        self._early_exits: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._exits: queue.Queue[tuple[int, int]] = queue.Queue()
        self._oom: OOMWatcher | None = None
        # Lifetime: after its last task the shim lingers `linger` seconds for the next container
        # (`start` reserves a place first), then exits; once exiting it refuses reservations.
        self.linger = linger
        self.log_to_bundle = log_to_bundle
        self._reserved: dict[str, float] = {}  # container id -> monotonic expiry
        self._exiting = False
        self._linger_timer: threading.Timer | None = None
        if reaper is not None:
            reaper.subscribe(lambda pid, status: self._exits.put((pid, status)))
        threading.Thread(target=self._exit_loop, name="exits", daemon=True).start()

    # -- ttrpc wiring ----------------------------------------------------------------------------
    def service(self) -> Service:
        rpcs = {
            "State": api.StateRequest,
            "Create": api.CreateTaskRequest,
            "Start": api.StartRequest,
            "Delete": api.DeleteRequest,
            "Pids": api.PidsRequest,
            "Pause": api.PauseRequest,
            "Resume": api.ResumeRequest,
            "Checkpoint": api.CheckpointTaskRequest,
            "Kill": api.KillRequest,
            "Exec": api.ExecProcessRequest,
            "ResizePty": api.ResizePtyRequest,
            "CloseIO": api.CloseIORequest,
            "Update": api.UpdateTaskRequest,
            "Wait": api.WaitRequest,
            "Stats": api.StatsRequest,
            "Connect": api.ConnectRequest,
            "Shutdown": api.ShutdownRequest,
        }
        return Service(TASK_SERVICE, {name: (req, getattr(self, name)) for name, req in rpcs.items()})

    def shim_service(self) -> Service:
        from revenant_pb.revenant.shim.v1 import shim_pb2 as shim_api

        return Service(SHIM_SERVICE, {"Reserve": (shim_api.ReserveRequest, self.Reserve)})

    def _runner(self) -> Callable[..., object]:
        from shim.runc.reaper import run_plain

        return self.reaper.run if self.reaper is not None else run_plain

    def _container(self, cid: str) -> Container:
        with self._lock:
            try:
                return self.containers[cid]
            except KeyError:
                raise NotFound(f"container {cid} not found") from None

    # -- exits -----------------------------------------------------------------------------------
    def _register_pid(self, pid: int, proc: Process) -> int | None:
        """Map pid -> process; returns an exit status the reaper already saw for it."""
        with self._lock:
            early = self._early_exits.pop(pid, None)
            if early is None:
                self._by_pid[pid] = proc
            return early

    def _exit_loop(self) -> None:
        while True:
            pid, status = self._exits.get()
            with self._lock:
                proc = self._by_pid.pop(pid, None)
                if proc is None:
                    # Not registered (yet): runc create/exec may not have returned the pid file.
                    self._early_exits[pid] = status
                    while len(self._early_exits) > 1024:
                        self._early_exits.popitem(last=False)
                    continue
            self._process_exited(proc, status)

    def _process_exited(self, proc: Process, status: int) -> None:
        with proc.lock:
            if proc.io is not None:
                proc.io.wait_output()
            if proc.is_init and self._oom is not None:
                self._oom.check(proc.container_id)  # TaskOOM before TaskExit, while the cgroup exists
            if not proc.set_exited(status):
                return
            assert proc.exit is not None
            log.info("%s (pid %d) exited with status %d", proc.name, proc.pid, status)
            self.publisher.publish(
                events.TaskExit(
                    container_id=proc.container_id,
                    id=proc.exec_id or proc.container_id,
                    pid=proc.pid,
                    exit_status=status,
                    exited_at=proc.exit.timestamp(),
                )
            )

    # -- RPCs ------------------------------------------------------------------------------------
    def Create(self, ctx: Context, req: api.CreateTaskRequest) -> api.CreateTaskResponse:
        if not req.id:
            raise InvalidArgument("CreateTaskRequest.id is empty")
        bundle = req.bundle or os.getcwd()
        try:
            opts = runtime_options.from_request(
                req.options if req.HasField("options") else None, bundle, self.namespace
            )
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        os.makedirs(opts.root, mode=0o711, exist_ok=True)
        runc = Runc(
            root=opts.root,
            log_path=os.path.join(bundle, "log.json"),
            binary=opts.binary,
            systemd_cgroup=opts.systemd_cgroup,
            runner=self._runner(),
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
        container = Container(
            id=req.id,
            bundle=bundle,
            namespace=self.namespace,
            runc=runc,
            options=opts,
            init=init,
            checkpoint=req.checkpoint,
        )
        with self._lock:
            if req.id in self.containers:
                raise AlreadyExists(f"container {req.id} already exists in this shim")
            if self._exiting:
                raise FailedPrecondition("this shim is shutting down")
            self.containers[req.id] = container
            self._reserved.pop(req.id, None)
            self._cancel_linger()
        try:
            self._create(container, req)
        except BaseException:
            with self._lock:
                self.containers.pop(req.id, None)
            self._cleanup_failed_create(container)
            raise
        if self.log_to_bundle is not None:
            self.log_to_bundle(bundle)
        self.publisher.publish(
            events.TaskCreate(
                container_id=req.id,
                bundle=bundle,
                rootfs=list(req.rootfs),
                io=events.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal),
                checkpoint=req.checkpoint,
                pid=init.pid,
            )
        )
        return api.CreateTaskResponse(pid=init.pid)

    def _create(self, c: Container, req: api.CreateTaskRequest) -> None:
        c.options.save(c.bundle)
        if self.protection is not None:
            # Before the rootfs is mounted: a checkpoint's writable layer may fill its upper dir.
            self.protection.before_create(c, req)
        c.rootfs = [mounts.Mount(m.type, m.source, tuple(m.options)) for m in req.rootfs]
        if c.rootfs:
            self._mount_rootfs(c)
        init = c.init
        init.io = ProcessIO(c.id, c.namespace, init.stdin, init.stdout, init.stderr, init.terminal)
        console_socket = init.io.prepare()
        if c.checkpoint:
            if self.checkpoint_engine is None:
                raise Unimplemented("creating a task from a checkpoint needs the checkpoint engine")
            self.checkpoint_engine.restore_create(c, req, init.io.fds, console_socket)
            c.console_socket = console_socket
            return
        self._runc_create(c, console_socket)

    def _mount_rootfs(self, c: Container) -> None:
        rootfs = os.path.join(c.bundle, "rootfs")
        os.makedirs(rootfs, mode=0o711, exist_ok=True)
        mounts.mount_all(c.rootfs, rootfs)
        c.rootfs_mounted = True

    def _unmount_rootfs(self, c: Container) -> None:
        if c.rootfs_mounted:
            mounts.unmount_all(os.path.join(c.bundle, "rootfs"))
            c.rootfs_mounted = False

    def _runc_create(self, c: Container, console_socket: str | None) -> None:
        init = c.init
        assert init.io is not None
        pid_file = os.path.join(c.bundle, "init.pid")
        try:
            c.runc.create(
                c.id,
                c.bundle,
                pid_file,
                init.io.fds,
                console_socket=console_socket,
                no_pivot=c.options.no_pivot_root,
                no_new_keyring=c.options.no_new_keyring,
            )
        except RuncError as e:
            raise _runc_failed(e) from None
        init.io.after_start()
        init.pid = _read_pid(pid_file)
        early = self._register_pid(init.pid, init)
        if early is not None:
            self._process_exited(init, early)
        else:
            self._watch_oom(c)  # before Start: the process cannot run out of memory before it runs

    def _cleanup_failed_create(self, c: Container) -> None:
        if self.protection is not None:
            self.protection.deleted(c.id)
        if c.init.io is not None:
            c.init.io.close()
        with contextlib.suppress(RuncError):
            c.runc.delete(c.id, force=True)
        if c.rootfs_mounted:
            mounts.unmount_all(os.path.join(c.bundle, "rootfs"))
            c.rootfs_mounted = False

    def Start(self, ctx: Context, req: api.StartRequest) -> api.StartResponse:
        c = self._container(req.id)
        proc = c.process(req.exec_id)
        with proc.lock:
            proc.check("start")
            if proc.is_init:
                if c.checkpoint:
                    early = self._start_from_checkpoint(c)
                else:
                    try:
                        c.runc.start(c.id)
                    except RuncError as e:
                        raise _runc_failed(e) from None
                    early = None
                proc.advance("start")
                self.publisher.publish(events.TaskStart(container_id=c.id, pid=proc.pid))
                if self.protection is not None:
                    self.protection.started(
                        c, pause=lambda: self._protective_pause(c), resume=lambda: c.runc.resume(c.id)
                    )
            else:
                early = self._start_exec(c, proc)
                proc.advance("start")
                self.publisher.publish(events.TaskExecStarted(container_id=c.id, exec_id=proc.exec_id, pid=proc.pid))
            if early is not None:
                self._process_exited(proc, early)
        return api.StartResponse(pid=proc.pid)

    def _start_from_checkpoint(self, c: Container) -> int | None:
        """runc restore; a store checkpoint that fails falls back to older ones, then to a fresh start."""
        assert self.checkpoint_engine is not None
        while True:
            try:
                c.init.pid = self.checkpoint_engine.restore_start(c)
                early = self._register_pid(c.init.pid, c.init)
                if early is None:
                    self._watch_oom(c)
                return early
            except TtrpcError as e:
                if self.protection is None or not self.protection.has_store_restore(c.id):
                    self._cleanup_failed_restore(c)
                    raise
                if not self.protection.restore_failed(
                    c, e, unmount=lambda: self._unmount_rootfs(c), mount=lambda: self._mount_rootfs(c)
                ):
                    break
        # No checkpoint left that restores: the task starts from its image, as if never checkpointed.
        self._runc_create(c, c.console_socket)
        if c.init.exit is not None:
            return None
        try:
            c.runc.start(c.id)
        except RuncError as e:
            raise _runc_failed(e) from None
        return None

    def _cleanup_failed_restore(self, c: Container) -> None:
        """A restore that failed leaves the task CREATED for containerd to delete; whatever runc and
        CRIU half-built (restored processes, runc state, cgroups) and the rootfs mount go now."""
        with contextlib.suppress(RuncError):
            c.runc.delete(c.id, force=True)
        try:
            self._unmount_rootfs(c)
        except OSError as e:
            log.warning("cannot unmount the rootfs of %s after its failed restore: %s", c.id, e)

    def _protective_pause(self, c: Container) -> bool:
        """Freeze a running task for a protective checkpoint; a task the user paused stays as it is."""
        if c.init.state is not State.RUNNING:
            return False
        c.runc.pause(c.id)
        return True

    def _watch_oom(self, c: Container) -> None:
        if self._oom is None:
            self._oom = OOMWatcher(lambda cid: self.publisher.publish(events.TaskOOM(container_id=cid)))
        self._oom.add(c.id, c.init.pid)

    def _start_exec(self, c: Container, proc: Process) -> int | None:
        if c.init.state is not State.RUNNING:
            raise FailedPrecondition(f"cannot start exec {proc.exec_id}: task {c.id} is {c.init.state.value}")
        spec_path = os.path.join(c.bundle, f"exec-{proc.exec_id}.json")
        pid_file = os.path.join(c.bundle, f"exec-{proc.exec_id}.pid")
        assert proc.io is not None
        with open(spec_path, "wb") as f:
            f.write(proc.spec)
        console_socket = proc.io.prepare()
        try:
            c.runc.exec(c.id, spec_path, pid_file, proc.io.fds, console_socket=console_socket)
            proc.io.after_start()
        except RuncError as e:
            proc.io.close()
            raise _runc_failed(e) from None
        except BaseException:
            proc.io.close()
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(spec_path)
        proc.pid = _read_pid(pid_file)
        with contextlib.suppress(OSError):
            os.unlink(pid_file)
        return self._register_pid(proc.pid, proc)

    def Exec(self, ctx: Context, req: api.ExecProcessRequest) -> empty_pb2.Empty:
        c = self._container(req.id)
        if not req.exec_id:
            raise InvalidArgument("ExecProcessRequest.exec_id is empty")
        c.init.check("exec")
        proc = Process(
            container_id=c.id,
            exec_id=req.exec_id,
            bundle=c.bundle,
            stdin=req.stdin,
            stdout=req.stdout,
            stderr=req.stderr,
            terminal=req.terminal,
            spec=req.spec.value,
        )
        proc.io = ProcessIO(c.id, c.namespace, req.stdin, req.stdout, req.stderr, req.terminal)
        with self._lock:
            if req.exec_id in c.execs:
                raise AlreadyExists(f"exec {req.exec_id} already exists in {c.id}")
            c.execs[req.exec_id] = proc
        self.publisher.publish(events.TaskExecAdded(container_id=c.id, exec_id=req.exec_id))
        return empty_pb2.Empty()

    def Delete(self, ctx: Context, req: api.DeleteRequest) -> api.DeleteResponse:
        c = self._container(req.id)
        proc = c.process(req.exec_id)
        with proc.lock:
            proc.check("delete")
            if proc.is_init:
                self._delete_init(c)
            else:
                with self._lock:
                    c.execs.pop(proc.exec_id, None)
                    self._by_pid.pop(proc.pid, None)
            if proc.io is not None:
                proc.io.close()
            proc.advance("delete")
        exit_ = proc.exit
        status = exit_.status if exit_ else 0
        resp = api.DeleteResponse(pid=proc.pid, exit_status=status)
        if exit_ is not None:
            resp.exited_at.CopyFrom(exit_.timestamp())
        if proc.is_init:
            self.publisher.publish(
                events.TaskDelete(container_id=c.id, pid=proc.pid, exit_status=status, exited_at=resp.exited_at)
            )
        return resp

    def _delete_init(self, c: Container) -> None:
        try:
            c.runc.delete(c.id, force=True)
        except RuncError as e:
            if not e.not_found:
                raise _runc_failed(e) from None
        self._unmount_rootfs(c)
        if self.protection is not None:
            self.protection.deleted(c.id)
        for ex in list(c.execs.values()):
            if ex.io is not None:
                ex.io.close()
        if self._oom is not None:
            self._oom.remove(c.id)
        with self._lock:
            self.containers.pop(c.id, None)
            self._by_pid.pop(c.init.pid, None)
            newest = next(reversed(self.containers.values()), None)
        if newest is not None and self.log_to_bundle is not None:
            self.log_to_bundle(newest.bundle)  # this bundle's FIFO goes away with it

    def State(self, ctx: Context, req: api.StateRequest) -> api.StateResponse:
        c = self._container(req.id)
        p = c.process(req.exec_id)
        resp = api.StateResponse(
            id=p.exec_id or c.id,
            bundle=c.bundle,
            pid=p.pid,
            status=_STATUS[p.state],
            stdin=p.stdin,
            stdout=p.stdout,
            stderr=p.stderr,
            terminal=p.terminal,
            exec_id=p.exec_id,
        )
        if p.exit is not None:
            resp.exit_status = p.exit.status
            resp.exited_at.CopyFrom(p.exit.timestamp())
        return resp

    def Pids(self, ctx: Context, req: api.PidsRequest) -> api.PidsResponse:
        c = self._container(req.id)
        c.init.check("pids")
        try:
            pids = c.runc.ps(c.id)
        except RuncError as e:
            raise _runc_failed(e) from None
        exec_by_pid = {p.pid: p.exec_id for p in list(c.execs.values()) if p.pid}
        resp = api.PidsResponse()
        for pid in pids:
            info = resp.processes.add(pid=pid)
            if pid in exec_by_pid:
                info.info.CopyFrom(pack_any(oci_pb2.ProcessDetails(exec_id=exec_by_pid[pid])))
        return resp

    def Pause(self, ctx: Context, req: api.PauseRequest) -> empty_pb2.Empty:
        c = self._container(req.id)
        with c.init.lock:
            c.init.check("pause")
            try:
                c.runc.pause(c.id)
            except RuncError as e:
                raise _runc_failed(e) from None
            c.init.advance("pause")
            self.publisher.publish(events.TaskPaused(container_id=c.id))
        return empty_pb2.Empty()

    def Resume(self, ctx: Context, req: api.ResumeRequest) -> empty_pb2.Empty:
        c = self._container(req.id)
        with c.init.lock:
            c.init.check("resume")
            try:
                c.runc.resume(c.id)
            except RuncError as e:
                raise _runc_failed(e) from None
            c.init.advance("resume")
            self.publisher.publish(events.TaskResumed(container_id=c.id))
        return empty_pb2.Empty()

    def Kill(self, ctx: Context, req: api.KillRequest) -> empty_pb2.Empty:
        c = self._container(req.id)
        proc = c.process(req.exec_id)
        # No process lock: a kill must get through while Start or an exit holds it.
        proc.check("kill")
        if proc.is_init and self.protection is not None and self.protection.before_kill(c, req.signal):
            return empty_pb2.Empty()  # the final checkpoint stopped the task; its exit follows
        if proc.is_init:
            try:
                c.runc.kill(c.id, req.signal, all_processes=req.all)
            except RuncError as e:
                if proc.exit is not None:
                    raise NotFound(f"{proc.name}: process already finished") from None
                raise _runc_failed(e) from None
        else:
            if not proc.pid:
                raise FailedPrecondition(f"cannot kill {proc.name}: it was never started")
            try:
                os.kill(proc.pid, req.signal)
            except ProcessLookupError:
                raise NotFound(f"{proc.name}: process already finished") from None
        return empty_pb2.Empty()

    def ResizePty(self, ctx: Context, req: api.ResizePtyRequest) -> empty_pb2.Empty:
        proc = self._container(req.id).process(req.exec_id)
        if proc.io is None or not proc.terminal:
            raise FailedPrecondition(f"{proc.name} has no terminal")
        proc.io.resize(req.width, req.height)
        return empty_pb2.Empty()

    def CloseIO(self, ctx: Context, req: api.CloseIORequest) -> empty_pb2.Empty:
        proc = self._container(req.id).process(req.exec_id)
        if req.stdin and proc.io is not None:
            proc.io.close_stdin()
        return empty_pb2.Empty()

    def Update(self, ctx: Context, req: api.UpdateTaskRequest) -> empty_pb2.Empty:
        c = self._container(req.id)
        c.init.check("update")
        if not req.resources.value:
            raise InvalidArgument("UpdateTaskRequest.resources is empty")
        try:
            c.runc.update(c.id, req.resources.value)
        except RuncError as e:
            raise _runc_failed(e) from None
        return empty_pb2.Empty()

    def Wait(self, ctx: Context, req: api.WaitRequest) -> api.WaitResponse:
        proc = self._container(req.id).process(req.exec_id)
        exit_ = proc.wait()
        assert exit_ is not None
        return api.WaitResponse(exit_status=exit_.status, exited_at=exit_.timestamp())

    def Stats(self, ctx: Context, req: api.StatsRequest) -> api.StatsResponse:
        from shim.task.stats import metrics_from_runc

        c = self._container(req.id)
        c.init.check("stats")
        try:
            data = c.runc.stats(c.id)
        except RuncError as e:
            raise _runc_failed(e) from None
        return api.StatsResponse(stats=pack_any(metrics_from_runc(data)))

    def Checkpoint(self, ctx: Context, req: api.CheckpointTaskRequest) -> empty_pb2.Empty:
        c = self._container(req.id)
        if self.checkpoint_engine is None:
            raise Unimplemented("checkpoint is not implemented by this shim yet")
        with c.init.lock:
            c.init.check("checkpoint")
            self.checkpoint_engine.checkpoint(c, req)
        self.publisher.publish(events.TaskCheckpointed(container_id=c.id, checkpoint=req.path))
        return empty_pb2.Empty()

    def Connect(self, ctx: Context, req: api.ConnectRequest) -> api.ConnectResponse:
        with self._lock:
            c = self.containers.get(req.id)
        return api.ConnectResponse(shim_pid=os.getpid(), task_pid=c.init.pid if c else 0, version=VERSION)

    def Shutdown(self, ctx: Context, req: api.ShutdownRequest) -> empty_pb2.Empty:
        with self._lock:
            if self.containers:
                return empty_pb2.Empty()  # other tasks still live here
            if self.linger > 0 and not req.now:
                self._arm_linger()
                return empty_pb2.Empty()
        self._exit_if_idle()
        return empty_pb2.Empty()

    # -- shim lifetime ---------------------------------------------------------------------------
    def Reserve(self, ctx: Context, req: object) -> object:
        from revenant_pb.revenant.shim.v1 import shim_pb2 as shim_api

        self.expect(getattr(req, "id", ""))
        return shim_api.ReserveResponse(pid=os.getpid())

    def expect(self, cid: str) -> None:
        """A container is about to be created here: stay up for it (RESERVATION_TTL at most)."""
        with self._lock:
            if self._exiting:
                raise FailedPrecondition("this shim is shutting down")
            self._reserved[cid] = time.monotonic() + RESERVATION_TTL
            self._cancel_linger()
            self._arm_linger()  # expires the reservation if containerd never creates the task

    def _cancel_linger(self) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None

    def _arm_linger(self) -> None:
        self._cancel_linger()
        delay = self.linger
        if self._reserved:
            delay = max(delay, min(self._reserved.values()) - time.monotonic())
        self._linger_timer = threading.Timer(max(delay, 0.01), self._exit_if_idle)
        self._linger_timer.daemon = True
        self._linger_timer.start()

    def _exit_if_idle(self) -> None:
        with self._lock:
            now = time.monotonic()
            self._reserved = {cid: t for cid, t in self._reserved.items() if t > now}
            if self.containers or self._exiting:
                return
            if self._reserved:
                self._arm_linger()
                return
            self._exiting = True
            self._cancel_linger()
        log.info("no task left: shutting down")
        self.on_shutdown()


def _read_pid(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())
