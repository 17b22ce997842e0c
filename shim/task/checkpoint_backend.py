"""The Task service's checkpoint backend: `ctr task checkpoint`, `ctr container checkpoint --task`
and create-from-checkpoint (`ctr containers restore --live`), as containerd's runc shim does them.

Checkpoint: CheckpointTaskRequest.options is a containerd.runc.v1.CheckpointOptions; the image goes
to options.image_path or else request.path. Create with `checkpoint` set leaves the task "created from
a checkpoint"; Start runs `runc restore`. containerd may delete the directory it unpacked the
checkpoint into once Create returns, so Create links (or copies) the images into the bundle first.
containerd 1.6-2.x never deletes that directory (`$XDG_RUNTIME_DIR` or the temp dir, `ctrd-checkpointN`):
every restore would leave the whole checkpoint behind, in RAM where /tmp is a tmpfs. Once the images
are linked into the bundle the shim removes containerd's copy (`remove_containerd_unpack_dir`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shim.checkpoint.engine import CheckpointEngine, CheckpointError, CheckpointResult
from shim.checkpoint.image_check import DamagedImage, check_image_dir
from shim.checkpoint.options import CheckpointOptions, RestoreOptions
from shim.errors import FailedPrecondition, InvalidArgument, RevenantError
from shim.runc.driver import IOFds

if TYPE_CHECKING:
    from revenant_pb.containerd.task.v2 import shim_pb2 as api
    from shim.task.container import Container

log = logging.getLogger(__name__)

CHECKPOINT_OPTIONS_TYPE = "containerd.runc.v1.CheckpointOptions"
RESTORE_DIR = "checkpoint"  # inside the bundle: the images a created-from-checkpoint task restores
# What containerd's Create names its unpacked copy of a checkpoint image: os.MkdirTemp(dir, "ctrd-checkpoint").
CONTAINERD_UNPACK_NAME = re.compile(r"ctrd-checkpoint[0-9]+")


def checkpoint_options_from(any_options: Any) -> tuple[CheckpointOptions, str]:
    """CheckpointOptions (and the image path it names) from CheckpointTaskRequest.options."""
    if any_options is None or not any_options.type_url:
        return CheckpointOptions(), ""
    if not any_options.type_url.endswith(CHECKPOINT_OPTIONS_TYPE):
        raise InvalidArgument(
            f"checkpoint options of type {any_options.type_url!r}; this shim takes {CHECKPOINT_OPTIONS_TYPE}"
        )
    from revenant_pb.containerd.runc.v1 import oci_pb2

    o = oci_pb2.CheckpointOptions()
    o.ParseFromString(any_options.value)
    try:
        opts = CheckpointOptions(
            exit=o.exit,
            open_tcp=o.open_tcp,
            external_unix_sockets=o.external_unix_sockets,
            terminal=o.terminal,
            file_locks=o.file_locks,
            empty_namespaces=tuple(o.empty_namespaces),
            cgroups_mode=o.cgroups_mode,
            work_path=Path(o.work_path) if o.work_path else None,
        )
    except ValueError as e:
        raise InvalidArgument(str(e)) from None
    return opts, o.image_path


def containerd_unpack_parent() -> Path:
    """Where containerd (whose environment the shim inherits) unpacks checkpoint images for Create."""
    return Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())


def remove_containerd_unpack_dir(source: Path) -> bool:
    """Remove `source` if it is containerd's own unpacked copy of a checkpoint image (a root-owned
    `ctrd-checkpointN` directory, not a link, right in containerd's temp dir); anything else (a
    user's directory given by path) is left alone. Returns whether it was removed."""
    if source.parent != containerd_unpack_parent() or not CONTAINERD_UNPACK_NAME.fullmatch(source.name):
        return False
    try:
        st = source.lstat()
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
        return False
    shutil.rmtree(source, ignore_errors=True)
    log.info("removed containerd's unpacked checkpoint %s (the task restores from its bundle's copy)", source)
    return True


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """Hard-link the images when they share a filesystem with the bundle (instant), else copy."""

    def link_or_copy(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link_or_copy, symlinks=True)


class RuncCheckpointBackend:
    """shim.task.container.CheckpointBackend over the checkpoint engine."""

    def __init__(
        self,
        engine: CheckpointEngine | None = None,
        on_checkpoint: Callable[[Container, CheckpointResult], None] | None = None,
    ) -> None:
        self.engine = engine or CheckpointEngine()
        self.on_checkpoint = on_checkpoint
        self._pending: dict[str, tuple[IOFds, str | None, RestoreOptions]] = {}
        self._lock = threading.Lock()
        self.last_results: dict[str, CheckpointResult] = {}

    def checkpoint(self, container: Container, request: api.CheckpointTaskRequest) -> None:
        log.debug("checkpoint %s: path %r, options %s", container.id, request.path, request.options)
        options, image_path = checkpoint_options_from(request.options if request.HasField("options") else None)
        target = image_path or request.path
        if not target:
            raise InvalidArgument("CheckpointTaskRequest has neither a path nor options.image_path")
        try:
            result = self.engine.checkpoint(
                container.runc, container.id, Path(target), options, keep_log_in=Path(container.bundle)
            )
        except CheckpointError as e:
            raise RevenantError(str(e)) from None
        self.last_results[container.id] = result
        if self.on_checkpoint is not None:
            self.on_checkpoint(container, result)

    def restore_create(
        self, container: Container, request: api.CreateTaskRequest, io: IOFds, console_socket: str | None
    ) -> None:
        """Remember how to restore at Start. The images are container.checkpoint: containerd's unpacked
        copy (linked into the bundle here) or a directory the lifecycle hooks' restore plan names (one
        protection fetched from the store)."""
        source = Path(container.checkpoint)
        if not (source / "inventory.img").is_file():
            raise InvalidArgument(f"{source} is not a CRIU checkpoint (no inventory.img)")
        if request.checkpoint:
            try:  # a user's directory may be damaged (store checkpoints are verified chunk by chunk)
                check_image_dir(source)
            except DamagedImage as e:
                raise InvalidArgument(f"cannot restore {container.id} from {source}: {e}") from None
            target = Path(container.bundle) / RESTORE_DIR
            shutil.rmtree(target, ignore_errors=True)
            link_or_copy_tree(source, target)
            container.checkpoint = str(target)
            if container.restore_plan is not None:  # Start restores from the plan's directory: the bundle's
                container.restore_plan = dataclasses.replace(container.restore_plan, checkpoint_dir=str(target))
            remove_containerd_unpack_dir(source)
        restore = RestoreOptions(
            checkpoint=CheckpointOptions(terminal=request.terminal), no_pivot=container.options.no_pivot_root
        )
        with self._lock:
            self._pending[container.id] = (io, console_socket, restore)

    def restore_start(self, container: Container) -> int:
        with self._lock:
            pending = self._pending.get(container.id)
        if pending is None:
            raise FailedPrecondition(f"{container.id} was not created from a checkpoint")
        io, console_socket, options = pending
        bundle = Path(container.bundle)
        work = Path(container.options.criu_work_path) if container.options.criu_work_path else bundle / "criu-work"
        try:
            result = self.engine.restore(
                container.runc,
                container.id,
                bundle,
                Path(container.checkpoint),
                options,
                pid_file=bundle / "init.pid",
                io=io,
                work_path=work,
                console_socket=console_socket,
                keep_log_in=bundle,
                lazy=container.restore_plan.lazy if container.restore_plan is not None else None,
            )
        except CheckpointError as e:
            raise RevenantError(str(e)) from None  # the stdio stays ours: a fallback may still use it
        with self._lock:
            self._pending.pop(container.id, None)
        if container.init.io is not None:
            container.init.io.after_start()  # runc's restored process holds the child ends now
        log.info("restored %s as pid %d in %.3fs", container.id, result.pid, result.duration_s)
        shutil.rmtree(bundle / RESTORE_DIR, ignore_errors=True)
        return result.pid
