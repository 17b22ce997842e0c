"""Parts of the shim built on first use, so a fresh shim answers its first request sooner.

Transparent protection (the store, its codecs and crypto, the CRIU engine, the GPU hooks) is most of
what a shim server imports, and a container that is not protected never needs it. A fresh shim per
container pays every import before it can answer Create, so these are built only when a container is
protected, a ctr checkpoint/restore arrives, or revenant.v1.Control asks for a checkpoint. Until then
each hook answers as ProtectionManager does for a shim that holds no protected container.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from shim.errors import InvalidArgument
from shim.task.hooks import ContainerControl, RestorePlan

if TYPE_CHECKING:
    from revenant_pb.containerd.task.v2 import shim_pb2 as api
    from shim.checkpoint import CheckpointEngine
    from shim.protect.checkpointer import CheckpointReport
    from shim.protect.manager import Protected, ProtectionManager
    from shim.protect.policy import NodeConfig
    from shim.protect.registry import TaskRecord
    from shim.runc.driver import IOFds
    from shim.task.container import CheckpointBackend, Container

T = TypeVar("T")


class Deferred(Generic[T]):
    """One value, built by `build` on the first get() (once, whichever thread asks first)."""

    def __init__(self, build: Callable[[], T]) -> None:
        self._build = build
        self._value: T | None = None
        self._lock = threading.Lock()

    def get(self) -> T:
        with self._lock:
            if self._value is None:
                self._value = self._build()
            return self._value

    @property
    def built(self) -> T | None:
        """The value if it was built, else None (never builds)."""
        return self._value


class DeferredProtection:
    """shim.task.hooks.LifecycleHooks and shim.protect.control's Protection over a ProtectionManager
    built the first time a container is protected (or Control needs it)."""

    def __init__(
        self,
        manager: Callable[[NodeConfig], ProtectionManager],
        engine: Deferred[CheckpointEngine],
        node_config: Callable[[], NodeConfig] | None = None,
    ) -> None:
        self._manager = Deferred(lambda: manager(self.node))
        self._engine = engine
        self._node_config = node_config
        self._node: NodeConfig | None = None

    @property
    def node(self) -> NodeConfig:
        if self._node is None:  # read once, as ProtectionManager does
            if self._node_config is None:
                from shim.protect.policy import load_node_config

                self._node_config = load_node_config
            self._node = self._node_config()
        return self._node

    @property
    def manager(self) -> ProtectionManager:
        return self._manager.get()

    @property
    def built(self) -> ProtectionManager | None:
        return self._manager.built

    def _protects(self, bundle: str) -> bool:
        from shim.protect.policy import PolicyError, bundle_annotations, protection_for

        try:
            return protection_for(bundle_annotations(bundle), self.node) is not None
        except PolicyError as e:  # the manager fails such a Create the same way
            raise InvalidArgument(str(e)) from None

    # -- LifecycleHooks: without a manager no container is protected ------------------------------
    def before_create(self, c: ContainerControl, requested_checkpoint: str) -> RestorePlan | None:
        if self.built is None and not self._protects(c.bundle):
            return None
        return self.manager.before_create(c, requested_checkpoint)

    def restore_failed(self, c: ContainerControl, error: Exception) -> RestorePlan | None:
        m = self.built
        return None if m is None else m.restore_failed(c, error)

    def started(self, c: ContainerControl) -> None:
        m = self.built
        if m is not None:
            m.started(c)

    def exited(self, cid: str, status: int, at: float) -> None:
        m = self.built
        if m is not None:
            m.exited(cid, status, at)

    def before_kill(self, c: ContainerControl, sig: int) -> bool:
        m = self.built
        return False if m is None else m.before_kill(c, sig)

    def deleted(self, c: ContainerControl) -> None:
        m = self.built
        if m is not None:
            m.deleted(c)  # forgets the container in the engine too
            return
        engine = self._engine.built
        if engine is not None:  # a ctr checkpoint built the engine alone
            engine.forget(c.id)

    # -- revenant.v1.Control ---------------------------------------------------------------------
    def get(self, cid: str) -> Protected | None:
        m = self.built
        return None if m is None else m.get(cid)

    def record(self, p: Protected) -> TaskRecord:
        return self.manager.record(p)

    def last_stats(self, cid: str) -> dict[str, Any] | None:
        engine = self._engine.built
        return None if engine is None else engine.last_stats(cid)

    def checkpoint(self, cid: str, *, exit: bool, reason: str, timeout_s: float | None = None) -> CheckpointReport:
        return self.manager.checkpoint(cid, exit=exit, reason=reason, timeout_s=timeout_s)


class DeferredCheckpointBackend:
    """shim.task.container.CheckpointBackend built on the first checkpoint or restore (ctr's)."""

    def __init__(self, build: Callable[[], CheckpointBackend]) -> None:
        self._backend = Deferred(build)

    def checkpoint(self, container: Container, request: api.CheckpointTaskRequest) -> None:
        self._backend.get().checkpoint(container, request)

    def restore_create(
        self, container: Container, request: api.CreateTaskRequest, io: IOFds, console_socket: str | None
    ) -> None:
        self._backend.get().restore_create(container, request, io, console_socket)

    def restore_start(self, container: Container) -> int:
        return self._backend.get().restore_start(container)
