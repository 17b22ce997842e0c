"""The long-lived shim process: subreaper, ttrpc server with the Task service, event publisher.

The composition root: it builds the task layer, transparent protection (the task layer's lifecycle
hooks) and the services on the shim's socket, and wires them together. Only the forked server imports
it (shim.daemon.main's `start` stays light), and it imports the rest only once its log reaches
containerd's, so an import that fails is seen there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time

from shim.daemon import shimlog

log = logging.getLogger(__name__)

# Seconds a shim waits after its last task before exiting, so the next container reuses it (one
# interpreter start instead of one per container). Overridden by REVENANT_SHIM_LINGER.
DEFAULT_LINGER = 10.0


class Shim:
    """The wired shim: its ttrpc server, subreaper, event publisher, task service and protection."""

    def __init__(self, server, reaper, publisher, service, protection) -> None:
        self.server, self.reaper, self.publisher = server, reaper, publisher
        self.service, self.protection = service, protection


def build(args, socket_path: str) -> Shim:  # args: shim.daemon.args.Args
    """Import and wire what the shim needs to answer its first request (and no more: checkpointing
    and protection load on first use). socket_path is bound already."""
    from shim.daemon.deferred import Deferred, DeferredCheckpointBackend, DeferredProtection
    from shim.daemon.grouping import shared_shims
    from shim.libc import set_child_subreaper
    from shim.protect.control import ControlService
    from shim.runc.reaper import Reaper
    from shim.task.events import Publisher
    from shim.task.lifetime import ShimLifetime
    from shim.task.service import ShimService, TaskService
    from shim.ttrpc import Server

    set_child_subreaper()
    reaper = Reaper()
    publisher = Publisher(os.environ.get("TTRPC_ADDRESS", ""), args.namespace)
    server = Server()
    own_socket = os.stat(socket_path).st_ino

    def shutdown() -> None:
        # Let go of the path first so a new `start` can bind it at once, but never remove a socket
        # that a newer shim already bound there.
        with contextlib.suppress(OSError):
            if os.stat(socket_path).st_ino == own_socket:
                os.unlink(socket_path)
        server.shutdown()

    # A per-container shim (REVENANT_SHIM_SHARED=0) has no one to wait for: it exits with its task.
    linger = float(os.environ.get("REVENANT_SHIM_LINGER", DEFAULT_LINGER)) if shared_shims() else 0.0

    # Checkpointing and protection are built on first use (shim.daemon.deferred): a fresh shim answers
    # Create without importing the store, CRIU or GPU code unless its container needs them.
    def build_engine():  # -> CheckpointEngine
        from shim.checkpoint import CheckpointEngine
        from shim.gpu.hooks import GpuDumpHooks
        from shim.runc.freezer import container_freezer

        # GPU hooks list a container's processes from its cgroup (they run inside the frozen window: no
        # runc process there), else through its own Runc (the subreaper's runner). One engine for ctr's
        # checkpoints and revenant's own, so checkpoints of one task never overlap.
        def container_pids(cid: str) -> list[int]:
            runc = service.containers[cid].runc
            freezer = container_freezer(runc.root, cid)
            if freezer is not None:
                try:
                    return freezer.pids()
                except (OSError, ValueError) as e:
                    log.info("cannot list %s's processes from cgroup %s (%s): using runc ps", cid, freezer.path, e)
            return runc.ps(cid)

        return CheckpointEngine(hooks=GpuDumpHooks(container_pids))

    engine = Deferred(build_engine)

    def publish(topic: str, text: str) -> None:
        from google.protobuf import wrappers_pb2

        publisher.publish(wrappers_pb2.StringValue(value=text), topic=topic)

    def build_protection(node):  # -> ProtectionManager (transparent protection: the task layer's hooks)
        from shim.protect.manager import ProtectionManager

        return ProtectionManager(
            args.namespace,
            f"unix://{socket_path}",
            engine=engine.get(),
            grpc_address=args.address,
            publish=publish,
            node=node,
        )

    def build_checkpoint_backend():  # -> RuncCheckpointBackend
        from shim.task.checkpoint_backend import RuncCheckpointBackend

        return RuncCheckpointBackend(engine.get())

    protection = DeferredProtection(build_protection, engine)
    lifetime = ShimLifetime(linger, on_shutdown=shutdown)
    service = TaskService(
        args.namespace,
        publisher,
        reaper,
        lifetime,
        checkpoint_engine=DeferredCheckpointBackend(build_checkpoint_backend),
        log_to_bundle=shimlog.retarget_stderr,
        hooks=protection,
    )
    server.register(service.service())
    server.register(ShimService(lifetime).service())
    server.register(ControlService(protection).service())
    lifetime.reserve(args.id)  # a shim whose containerd never sends Create does not live forever
    return Shim(server, reaper, publisher, service, protection)


# What build() and a first Create import, for the zygote (shim.daemon.zygote) to import once for all
# the shims it forks. Nothing deferred (shim.daemon.deferred) belongs here: every shim would map it.
PRELOAD = (
    "google.protobuf.wrappers_pb2",  # published texts
    "revenant_pb.containerd.runc.v1.oci_pb2",  # runtime options at Create
    "shim.daemon.deferred",
    "shim.daemon.grouping",
    "shim.daemon.args",  # a forked shim parses its arguments with it
    "shim.libc",
    "shim.protect.control",
    "shim.protect.policy",  # every Create asks it whether the container is protected
    "shim.runc.reaper",
    "shim.task.events",
    "shim.task.lifetime",
    "shim.task.service",
    "shim.ttrpc",
)


def preload() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)


def serve(
    args, listener, socket_path: str, t0: float | None = None, forked_by: str = "start"
) -> int:  # args: shim.daemon.args.Args
    fd = shimlog.open_log_fifo("log")
    if fd is not None:
        os.dup2(fd, 2)  # tracebacks of a crash reach containerd's log too
        os.close(fd)
    shimlog.setup(2, args.debug, {"runtime": "io.containerd.revenant.v1", "namespace": args.namespace})
    shim = build(args, socket_path)
    server, reaper, publisher = shim.server, shim.reaper, shim.publisher

    def serve_then_stop() -> None:
        try:
            server.serve(listener)
        except Exception:
            log.exception("ttrpc server failed")
        finally:
            reaper.stop()

    threading.Thread(target=serve_then_stop, name="ttrpc-accept", daemon=True).start()
    started = f" ({(time.monotonic() - t0) * 1e3:.0f} ms after fork by {forked_by})" if t0 is not None else ""
    log.info("shim %d serving on %s%s", os.getpid(), socket_path, started)
    reaper.loop()  # main thread: SIGCHLD handling runs here
    publisher.close()
    _finish_replication()
    log.info("shim %d exiting", os.getpid())
    return 0


def _finish_replication() -> None:
    """Copies of its last checkpoints still on their way to replicas get a bounded time to land (the
    socket is gone: containerd no longer talks to this process); the rest is caught up later."""
    replication = sys.modules.get("shim.store.replication")  # loaded only if this shim replicated
    if replication is not None:
        replication.drain_all(float(os.environ.get("REVENANT_REPLICATION_DRAIN_S", "120")))
