"""The task layer's seams without a containerd: a Container's restore at Start walks the restore plans
the lifecycle hooks return, in order, and protection hands out its store checkpoints newest first,
then says why the task starts fresh."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from shim.errors import RevenantError
from shim.protect.checkpointer import CRIU_DIR
from shim.protect.manager import ProtectionManager
from shim.protect.policy import KEY, STORE, NodeConfig
from shim.runc.driver import Runc
from shim.store import open_store
from shim.task import mounts
from shim.task.container import Container, TaskRuntime
from shim.task.exits import ExitRegistry
from shim.task.hooks import ContainerControl, LifecycleHooks, NoHooks, RestorePlan
from shim.task.oom import OOMWatcher
from shim.task.process import Process
from shim.task.runtime_options import RuntimeOptions
from shim.task.stdio import ProcessIO

GONE_PID = 2**22 + 17  # above pid_max's default: no process, so no OOM watch and no signal


class RuncRunner:
    """Stands in for running the runc binary: records each command; `create` writes its pid file."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    def __call__(self, argv: list[str], **kwargs: object) -> SimpleNamespace:
        command = argv[argv.index("json") + 1]
        self.commands.append(command)
        if command == "create":
            Path(argv[argv.index("--pid-file") + 1]).write_text(str(GONE_PID))
        return SimpleNamespace(status=0, stdout=b"")


@dataclass
class Backend:
    """Restores every checkpoint dir except those in `broken`; records the dirs it was asked for."""

    broken: set[str]
    attempts: list[str] = field(default_factory=list)

    def checkpoint(self, container: Container, request: object) -> None:
        raise AssertionError("not used here")

    def restore_create(self, container: Container, request: object, io: object, console_socket: object) -> None:
        pass

    def restore_start(self, container: Container) -> int:
        self.attempts.append(container.checkpoint)
        if container.checkpoint in self.broken:
            raise RevenantError(f"criu could not restore {container.checkpoint}")
        return GONE_PID + len(self.attempts)


class FallbackHooks(NoHooks):
    """Returns the next of `plans` after each failed restore; records what it was told."""

    def __init__(self, plans: list[RestorePlan | None], timeline: list[str] | None = None) -> None:
        self.plans = plans
        self.failures: list[str] = []
        self.timeline = timeline if timeline is not None else []

    def restore_failed(self, c, error: Exception) -> RestorePlan | None:
        self.failures.append(str(error))
        self.timeline.append(f"restore_failed mounted={c.rootfs_mounted}")
        return self.plans.pop(0)


@pytest.fixture
def mount_calls(monkeypatch) -> list[str]:
    """The rootfs (un)mounts a Container makes, recorded instead of done (no root needed)."""
    calls: list[str] = []
    monkeypatch.setattr(mounts, "mount_all", lambda ms, target: calls.append(f"mount {len(ms)}"))
    monkeypatch.setattr(mounts, "unmount_all", lambda target: calls.append("unmount"))
    return calls


def make_container(tmp_path: Path, hooks: NoHooks, backend: Backend, runner: RuncRunner) -> Container:
    exits: list[tuple[Process, int]] = []
    runtime = TaskRuntime(
        namespace="ns",
        exits=ExitRegistry(lambda proc, status: exits.append((proc, status))),
        oom=OOMWatcher(lambda cid: None),
        hooks=hooks,
        backend=backend,
        runner=runner,
    )
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    runc = Runc(root=str(tmp_path / "root"), log_path=str(bundle / "log.json"), runner=runner)
    init = Process(container_id="c1", exec_id="", bundle=str(bundle))
    c = Container("c1", str(bundle), "ns", runc, RuntimeOptions(root=str(tmp_path / "root")), init, runtime)
    init.io = ProcessIO("c1", "ns", "", "", "", False)
    init.io.prepare()
    c.rootfs = [mounts.Mount("overlay", "overlay", ("upperdir=/u", "lowerdir=/l", "workdir=/w"))]
    c.rootfs_mounted = True  # as after Create
    return c


def test_restore_walks_the_hooks_plans_in_order_until_one_restores(tmp_path: Path, mount_calls: list[str]):
    backend = Backend(broken={"/ck/3", "/ck/2"})
    hooks = FallbackHooks(
        [RestorePlan("/ck/2", fall_back=True), RestorePlan("/ck/1", fall_back=True)], timeline=mount_calls
    )
    c = make_container(tmp_path, hooks, backend, RuncRunner())
    c.restore_plan = RestorePlan("/ck/3", fall_back=True)

    assert c.start(c.init) is None
    assert backend.attempts == ["/ck/3", "/ck/2", "/ck/1"]
    assert hooks.failures == ["criu could not restore /ck/3", "criu could not restore /ck/2"]
    # The hooks are asked with the rootfs unmounted (they may refill its upper dir); it is mounted again.
    assert mount_calls == ["unmount", "restore_failed mounted=False", "mount 1"] * 2
    assert c.rootfs_mounted and c.init.pid == GONE_PID + 3 and c.checkpoint == "/ck/1"


def test_no_plan_left_starts_the_task_fresh_from_its_image(tmp_path: Path, mount_calls: list[str]):
    backend = Backend(broken={"/ck/1"})
    runner = RuncRunner()
    c = make_container(tmp_path, FallbackHooks([None]), backend, runner)
    c.restore_plan = RestorePlan("/ck/1", fall_back=True)

    c.start(c.init)
    assert backend.attempts == ["/ck/1"]
    assert runner.commands == ["create", "start"]
    assert c.init.pid == GONE_PID and c.restore_plan is None and c.checkpoint == ""


def test_a_plan_without_fallback_fails_the_start_and_cleans_up(tmp_path: Path, mount_calls: list[str]):
    backend = Backend(broken={"/user/ck"})
    runner = RuncRunner()
    hooks = FallbackHooks([RestorePlan("/never", fall_back=True)])
    c = make_container(tmp_path, hooks, backend, runner)
    c.restore_plan = RestorePlan("/user/ck")  # containerd's own checkpoint (ctr restore)

    with pytest.raises(RevenantError, match="could not restore /user/ck"):
        c.start(c.init)
    assert backend.attempts == ["/user/ck"] and hooks.failures == []
    assert runner.commands == ["delete"] and mount_calls == ["unmount"] and not c.rootfs_mounted


@dataclass
class Control:
    """hooks.ContainerControl for a container that was never run."""

    id: str
    namespace: str
    bundle: str
    runc: object = None
    rootfs: list = field(default_factory=list)  # no overlay: no writable layer
    init_pid: int = 0

    def pause_for_checkpoint(self) -> bool:
        return False

    def resume_after_checkpoint(self) -> None:
        pass


def test_protection_plans_its_checkpoints_newest_first_then_fresh_with_the_reasons(tmp_path: Path):
    url, key = f"file://{tmp_path / 'store'}", "team/job"
    for n in (1, 2, 3):
        src = tmp_path / f"ck{n}"
        (src / CRIU_DIR).mkdir(parents=True)
        (src / CRIU_DIR / "inventory.img").write_text(f"images {n}")
        with open_store(url) as store:
            store.put(key, src, metadata={})
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"annotations": {KEY: key, STORE: url}}))
    events: list[dict] = []
    node = NodeConfig(run_dir=tmp_path / "run", staging_dir=tmp_path / "staging", allow_store_urls=True)
    manager = ProtectionManager(
        "ns", "unix:///nowhere", node=node, publish=lambda topic, text: events.append(json.loads(text))
    )
    c = Control("c1", "ns", str(bundle))
    images = []
    try:
        plan = manager.before_create(c, requested_checkpoint="")
        while plan is not None:
            assert plan.fall_back
            images.append(Path(plan.checkpoint_dir, "inventory.img").read_text())
            failed, plan = plan, manager.restore_failed(c, RevenantError(f"criu failed on try {len(images)}"))
            assert not os.path.exists(failed.checkpoint_dir)  # the failed plan's files are gone
    finally:
        manager.deleted(c)
    assert images == ["images 3", "images 2", "images 1"]
    assert events[-1]["outcome"] == "fresh" and "did not restore (criu failed on try 3)" in events[-1]["detail"]
    assert manager.get("c1") is None


def test_a_requested_checkpoint_wins_over_the_store(tmp_path: Path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    url = f"file://{tmp_path / 'store'}"
    (bundle / "config.json").write_text(json.dumps({"annotations": {KEY: "team/job", STORE: url}}))
    manager = ProtectionManager(
        "ns", "unix:///nowhere", node=NodeConfig(run_dir=tmp_path / "run", allow_store_urls=True)
    )
    c = Control("c1", "ns", str(bundle))
    assert manager.before_create(c, requested_checkpoint="/from/ctr") is None
    assert manager.get("c1") is not None  # still protected: checkpoints are taken once it runs
    manager.deleted(c)


def test_exit_seen_before_its_pid_is_registered_is_handed_back(tmp_path: Path):
    seen: list[tuple[int, int]] = []
    done = threading.Event()
    registry = ExitRegistry(lambda proc, status: (seen.append((proc.pid, status)), done.set()))
    early = Process(container_id="c", exec_id="", bundle=str(tmp_path), pid=101)
    registry.reaped(101, 9)  # reaped before runc create returned its pid
    late = Process(container_id="c", exec_id="e", bundle=str(tmp_path), pid=102)
    assert registry.register(102, late) is None
    registry.reaped(102, 3)
    assert done.wait(5)
    assert seen == [(102, 3)]
    assert registry.register(101, early) == 9  # the caller reports it


@pytest.mark.parametrize("hook", ["before_create", "restore_failed", "started", "before_kill", "deleted"])
def test_protection_implements_every_lifecycle_hook(hook: str):
    declared = inspect.signature(getattr(LifecycleHooks, hook))
    assert list(inspect.signature(getattr(ProtectionManager, hook)).parameters) == list(declared.parameters)
    assert list(inspect.signature(getattr(NoHooks, hook)).parameters) == list(declared.parameters)


def test_a_container_is_what_the_hooks_may_control():
    fields = {f.name for f in dataclasses.fields(Container)}
    for name in ("id", "namespace", "bundle", "runc", "rootfs"):
        assert name in fields
    for name in ("pause_for_checkpoint", "resume_after_checkpoint"):
        assert callable(getattr(Container, name)) and hasattr(ContainerControl, name)
    assert isinstance(Container.init_pid, property)
