"""containerd.task.v2.Task and revenant.shim.v1.Shim: the RPC adapters of the shim.

Each RPC looks the container up, calls it (shim.task.container owns the lifecycle), turns the result
into the response and publishes the event. Containers are keyed by id (one shim may serve a whole
sandbox group). Exits come from the subreaper through shim.task.exits; how long the shim lives is
shim.task.lifetime's. Errors are shim.errors kinds; the ttrpc server converts them at its edge.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from google.protobuf import empty_pb2

from revenant_pb.containerd.events import task_pb2 as events
from revenant_pb.containerd.runc.v1 import oci_pb2
from revenant_pb.containerd.task.v2 import shim_pb2 as api
from revenant_pb.containerd.v1.types import task_pb2 as types
from revenant_pb.revenant.shim.v1 import shim_pb2 as shim_api
from shim.errors import AlreadyExists, NotFound
from shim.runc.driver import Runner
from shim.runc.reaper import Reaper
from shim.task.container import CheckpointBackend, Container, TaskRuntime
from shim.task.events import pack_any
from shim.task.exits import ExitRegistry
from shim.task.hooks import EventSink, LifecycleHooks, NoHooks
from shim.task.lifetime import ShimLifetime
from shim.task.oom import OOMWatcher
from shim.task.process import Process, State
from shim.ttrpc import Context, Service
from shim.version import __version__

log = logging.getLogger(__name__)

TASK_API = api.DESCRIPTOR.services_by_name["Task"]
SHIM_API = shim_api.DESCRIPTOR.services_by_name["Shim"]
VERSION = f"revenant-shim {__version__}"
_STATUS = {
    State.CREATED: types.CREATED,
    State.RUNNING: types.RUNNING,
    State.PAUSED: types.PAUSED,
    State.STOPPED: types.STOPPED,
    State.DELETED: types.STOPPED,
}


class TaskService:
    def __init__(
        self,
        namespace: str,
        publisher: EventSink,
        reaper: Reaper | None,
        lifetime: ShimLifetime,
        checkpoint_engine: CheckpointBackend | None = None,
        log_to_bundle: Callable[[str], None] | None = None,
        hooks: LifecycleHooks | None = None,
    ) -> None:
        self.namespace = namespace
        self.publisher = publisher
        self.lifetime = lifetime
        self.log_to_bundle = log_to_bundle
        self._lock = threading.Lock()  # containers
        self.containers: dict[str, Container] = {}
        # Containers whose init is being killed: its exit (Wait, TaskExit) is held until that Kill
        # returns. containerd's CRI deletes a task as soon as Wait returns, and the Delete closes the
        # task's connection, failing a Kill still taking its final checkpoint ("ttrpc: closed").
        self._exits_held: dict[str, list[tuple[Process, int]]] = {}
        exits = ExitRegistry(self._process_exited)
        if reaper is not None:
            reaper.subscribe(exits.reaped)
        self.runtime = TaskRuntime(
            namespace=namespace,
            exits=exits,
            oom=OOMWatcher(lambda cid: self.publisher.publish(events.TaskOOM(container_id=cid))),
            hooks=hooks or NoHooks(),
            backend=checkpoint_engine,
            runner=_runner(reaper),
        )

    def service(self) -> Service:
        return Service.from_descriptor(TASK_API, self)

    def _container(self, cid: str) -> Container:
        with self._lock:
            c = self.containers.get(cid)
        if c is None:
            raise NotFound(f"container {cid} not found")
        return c

    def _process_exited(self, proc: Process, status: int) -> None:
        """Report an exit (the exit registry's callback, or an early exit found after a start)."""
        if proc.is_init:
            with self._lock:
                held = self._exits_held.get(proc.container_id)
                if held is not None:
                    held.append((proc, status))
                    return
        with proc.lock:
            if proc.io is not None:
                proc.io.wait_output()
            if proc.is_init:
                self.runtime.oom.check(proc.container_id)  # TaskOOM before TaskExit, while the cgroup exists
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
            if proc.is_init:
                self.runtime.hooks.exited(proc.container_id, status, proc.exit.at)

    # -- RPCs ------------------------------------------------------------------------------------
    def Create(self, ctx: Context, req: api.CreateTaskRequest) -> api.CreateTaskResponse:
        c = Container.new(req, self.runtime)
        with self._lock:
            if req.id in self.containers:
                raise AlreadyExists(f"container {req.id} already exists in this shim")
            self.lifetime.admit(req.id)
            self.containers[req.id] = c
        try:
            c.create(req)
        except BaseException:
            with self._lock:
                self.containers.pop(req.id, None)
            self.lifetime.release(req.id)
            c.cleanup_failed_create()
            raise
        if self.log_to_bundle is not None:
            self.log_to_bundle(c.bundle)
        self.publisher.publish(
            events.TaskCreate(
                container_id=req.id,
                bundle=c.bundle,
                rootfs=list(req.rootfs),
                io=events.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal),
                checkpoint=req.checkpoint,
                pid=c.init.pid,
            )
        )
        return api.CreateTaskResponse(pid=c.init.pid)

    def Start(self, ctx: Context, req: api.StartRequest) -> api.StartResponse:
        c = self._container(req.id)
        proc = c.process(req.exec_id)
        with proc.lock:
            proc.check("start")
            early = c.start(proc)
            proc.advance("start")
            if proc.is_init:
                self.publisher.publish(events.TaskStart(container_id=c.id, pid=proc.pid))
                c.started()
            else:
                self.publisher.publish(events.TaskExecStarted(container_id=c.id, exec_id=proc.exec_id, pid=proc.pid))
            if early is not None:
                self._process_exited(proc, early)
        return api.StartResponse(pid=proc.pid)

    def Exec(self, ctx: Context, req: api.ExecProcessRequest) -> empty_pb2.Empty:
        c = self._container(req.id)
        c.add_exec(req)
        self.publisher.publish(events.TaskExecAdded(container_id=c.id, exec_id=req.exec_id))
        return empty_pb2.Empty()

    def Delete(self, ctx: Context, req: api.DeleteRequest) -> api.DeleteResponse:
        c = self._container(req.id)
        proc = c.process(req.exec_id)
        with proc.lock:
            c.delete(proc)
        if proc.is_init:
            with self._lock:
                self.containers.pop(c.id, None)
                newest = next(reversed(self.containers.values()), None)
            self.lifetime.release(c.id)
            if newest is not None and self.log_to_bundle is not None:
                self.log_to_bundle(newest.bundle)  # this bundle's FIFO goes away with it
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
        resp = api.PidsResponse()
        for pid, exec_id in self._container(req.id).pids():
            info = resp.processes.add(pid=pid)
            if exec_id:
                info.info.CopyFrom(pack_any(oci_pb2.ProcessDetails(exec_id=exec_id)))
        return resp

    def Pause(self, ctx: Context, req: api.PauseRequest) -> empty_pb2.Empty:
        c = self._container(req.id)
        with c.init.lock:  # the event goes out in the order of the state changes
            c.pause()
            self.publisher.publish(events.TaskPaused(container_id=c.id))
        return empty_pb2.Empty()

    def Resume(self, ctx: Context, req: api.ResumeRequest) -> empty_pb2.Empty:
        c = self._container(req.id)
        with c.init.lock:
            c.resume()
            self.publisher.publish(events.TaskResumed(container_id=c.id))
        return empty_pb2.Empty()

    def Kill(self, ctx: Context, req: api.KillRequest) -> empty_pb2.Empty:
        c = self._container(req.id)
        proc = c.process(req.exec_id)
        if not proc.is_init:
            c.kill(proc, req.signal, all_processes=req.all)
            return empty_pb2.Empty()
        with self._lock:
            first = c.id not in self._exits_held
            if first:
                self._exits_held[c.id] = []
        try:
            # A second stop signal while the first takes the final checkpoint goes straight to runc.
            c.kill(proc, req.signal, all_processes=req.all, final_checkpoint=first)
        finally:
            if first:
                with self._lock:
                    held = self._exits_held.pop(c.id, [])
                for p, status in held:
                    self._process_exited(p, status)
        return empty_pb2.Empty()

    def ResizePty(self, ctx: Context, req: api.ResizePtyRequest) -> empty_pb2.Empty:
        self._container(req.id).resize_pty(req.exec_id, req.width, req.height)
        return empty_pb2.Empty()

    def CloseIO(self, ctx: Context, req: api.CloseIORequest) -> empty_pb2.Empty:
        self._container(req.id).close_io(req.exec_id, stdin=req.stdin)
        return empty_pb2.Empty()

    def Update(self, ctx: Context, req: api.UpdateTaskRequest) -> empty_pb2.Empty:
        self._container(req.id).update(req.resources.value)
        return empty_pb2.Empty()

    def Wait(self, ctx: Context, req: api.WaitRequest) -> api.WaitResponse:
        proc = self._container(req.id).process(req.exec_id)
        exit_ = proc.wait()
        assert exit_ is not None
        return api.WaitResponse(exit_status=exit_.status, exited_at=exit_.timestamp())

    def Stats(self, ctx: Context, req: api.StatsRequest) -> api.StatsResponse:
        from shim.task.stats import metrics_from_runc

        data = self._container(req.id).stats()
        return api.StatsResponse(stats=pack_any(metrics_from_runc(data)))

    def Checkpoint(self, ctx: Context, req: api.CheckpointTaskRequest) -> empty_pb2.Empty:
        c = self._container(req.id)
        c.checkpoint_task(req)
        self.publisher.publish(events.TaskCheckpointed(container_id=c.id, checkpoint=req.path))
        return empty_pb2.Empty()

    def Connect(self, ctx: Context, req: api.ConnectRequest) -> api.ConnectResponse:
        with self._lock:
            c = self.containers.get(req.id)
        return api.ConnectResponse(shim_pid=os.getpid(), task_pid=c.init.pid if c else 0, version=VERSION)

    def Shutdown(self, ctx: Context, req: api.ShutdownRequest) -> empty_pb2.Empty:
        self.lifetime.shutdown_requested(now=req.now)
        return empty_pb2.Empty()


class ShimService:
    """revenant.shim.v1.Shim: `start` reserves a place here for its container before containerd
    creates it (see shim.daemon.main)."""

    def __init__(self, lifetime: ShimLifetime) -> None:
        self.lifetime = lifetime

    def service(self) -> Service:
        return Service.from_descriptor(SHIM_API, self)

    def Reserve(self, ctx: Context, req: shim_api.ReserveRequest) -> shim_api.ReserveResponse:
        self.lifetime.reserve(req.id)
        return shim_api.ReserveResponse(pid=os.getpid())


def _runner(reaper: Reaper | None) -> Runner:
    from shim.runc.reaper import run_plain

    return reaper.run if reaper is not None else run_plain
