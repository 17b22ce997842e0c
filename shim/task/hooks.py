"""The task layer's seams: what it calls out to, declared here so layers above implement them.

- LifecycleHooks: called by a Container at create / start / restore failure / kill / delete. Transparent
  protection (shim.protect) implements it; the composition root (shim.daemon.server) wires it in.
- ContainerControl: what such hooks may do with a container (freeze it for a protective checkpoint,
  read its bundle and rootfs mounts). Hooks never mutate the container: they return a RestorePlan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from google.protobuf.message import Message

    from shim.checkpoint.lazy_restore import LazyRestore
    from shim.runc.driver import Runc
    from shim.task.mounts import Mount


@dataclass(frozen=True)
class RestorePlan:
    """Where a created task restores from at Start, and what a failed restore leads to.

    fall_back=False (containerd asked for this checkpoint: ctr restore): a failed restore fails the
    Start. fall_back=True (a checkpoint the hooks chose): the container asks the hooks for the next
    plan (LifecycleHooks.restore_failed) until one restores, or starts fresh from its image."""

    checkpoint_dir: str  # CRIU images
    fall_back: bool = False
    lazy: LazyRestore | None = None  # the pages files lack their lazy ranges: this source delivers them


class EventSink(Protocol):
    def publish(self, event: Message) -> None: ...


class ContainerControl(Protocol):
    """The part of a Container that lifecycle hooks see."""

    id: str
    namespace: str
    bundle: str
    runc: Runc

    @property
    def rootfs(self) -> Sequence[Mount]:
        """The rootfs mounts as CreateTaskRequest gave them (type, source, options)."""
        ...

    @property
    def init_pid(self) -> int: ...

    def pause_for_checkpoint(self) -> bool:
        """Freeze a running task; True when it froze it (a task the user paused is left as it is)."""
        ...

    def resume_after_checkpoint(self) -> None:
        """Thaw what pause_for_checkpoint froze."""


class LifecycleHooks(Protocol):
    def before_create(self, c: ContainerControl, requested_checkpoint: str) -> RestorePlan | None:
        """Before the rootfs is mounted (its upper dir may be filled). `requested_checkpoint` is the
        directory containerd asked to restore from ("" for none), which wins over any the hooks know.
        Returns where to restore from at Start, or None. Raising fails the Create."""
        ...

    def restore_failed(self, c: ContainerControl, error: Exception) -> RestorePlan | None:
        """A fall_back plan did not restore. Called with the rootfs unmounted; returns the next plan,
        or None to start fresh from the image."""
        ...

    def started(self, c: ContainerControl) -> None:
        """The task's init runs (restored or fresh); its pid is known."""

    def exited(self, cid: str, status: int, at: float) -> None:
        """The init process of container `cid` ended with `status` at `at` (time.time())."""

    def before_kill(self, c: ContainerControl, sig: int) -> bool:
        """Before a signal to the init; True when the hooks already stopped the task."""
        ...

    def deleted(self, c: ContainerControl) -> None:
        """The container is gone (deleted, or its Create failed)."""


class NoHooks:
    """LifecycleHooks that do nothing: a shim without protection."""

    def before_create(self, c: ContainerControl, requested_checkpoint: str) -> RestorePlan | None:
        return None

    def restore_failed(self, c: ContainerControl, error: Exception) -> RestorePlan | None:
        return None

    def started(self, c: ContainerControl) -> None:
        pass

    def exited(self, cid: str, status: int, at: float) -> None:
        pass

    def before_kill(self, c: ContainerControl, sig: int) -> bool:
        return False

    def deleted(self, c: ContainerControl) -> None:
        pass
