"""Transparent protection inside the shim: one ProtectionManager per shim process.

It implements the task layer's LifecycleHooks (shim.task.hooks), which each Container calls:
  before_create  -> policy from the bundle's annotations (bad values fail Create); for a protected
                    container with a usable checkpoint, fill the rootfs upper dir from it and return a
                    restore plan, so Start restores instead of starting fresh.
  restore_failed -> at Start, a checkpoint that CRIU could not restore: prepare the next older one
                    (its plan), or None to start fresh, saying why.
  started        -> registry record for the agent and CLI; periodic checkpoints begin.
  exited         -> the attempt's end, for a restart in the same pod (shim.protect.restarts).
  before_kill    -> with checkpoint-on-stop, a stop signal first takes a final checkpoint (bounded).
  deleted        -> periodic checkpoints stop; the registry record goes.
It sees a container only through shim.task.hooks.ContainerControl. revenant.v1.Control (Checkpoint,
Status, Stats) on the shim's socket is shim.protect.control's, over this manager.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shim.checkpoint import CheckpointEngine, CheckpointError
from shim.checkpoint.lazy_restore import LazyRestore
from shim.errors import FailedPrecondition, InvalidArgument, NotFound, RevenantError, Unavailable
from shim.protect import registry, restorer
from shim.protect.policy import (
    CRI_CONTAINER_NAME,
    CRI_POD_NAME,
    CRI_POD_NAMESPACE,
    NodeConfig,
    PolicyError,
    bundle_annotations,
    load_node_config,
    protection_for,
)
from shim.protect.restore_breakdown import describe, restore_breakdown
from shim.store.errors import Fenced
from shim.task import mounts
from shim.task.hooks import ContainerControl, RestorePlan

from .checkpointer import Checkpointer, CheckpointReport, ProtectedContainer, claim_key
from .image_identity import ImageIdentity, ImageLookup
from .periodic import PeriodicCheckpoints
from .restarts import Attempt, KeyHistory, RestartPolicy, decide
from .restorer import NoUsableCheckpoint, Restorer, RestoreUnavailable, clear_upper_dir, fill_upper_dir
from .staging import sweep_leftovers

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGKILL, signal.SIGINT)
RESTORE_TOPIC = "/revenant/restore"


@dataclass
class Protected:
    container: ProtectedContainer
    plan: restorer.RestorePlan | None = None  # the store checkpoint fetched for the restore at Start
    tried_seqs: list[int] = field(default_factory=list)
    restored_from: int | None = None
    restore_breakdown: dict[str, Any] | None = None  # where the last restore's time went (restore_breakdown.py)
    fresh_reason: str | None = None
    periodic: PeriodicCheckpoints | None = None
    last_report: CheckpointReport | None = None
    last_committed_at: float = 0.0  # wall clock when last_report's checkpoint was committed
    last_error: str | None = None
    kubernetes: dict[str, str] = field(default_factory=dict)  # pod, pod_namespace, container (CRI)
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    restart_reason: str | None = None  # set when this is a restart of the key inside its pod
    attempt: Attempt | None = None
    busy: threading.Lock = field(default_factory=threading.Lock)  # one protective checkpoint at a time
    # The rootfs overlay as mounted before the shim ran (dockerd's graph driver), else None.
    premounted: mounts.MountInfo | None = None
    # Guards the registry record: once Delete removed it, a checkpoint finishing late must not rewrite it.
    record_lock: threading.Lock = field(default_factory=threading.Lock)
    gone: bool = False


def kubernetes_identity(annotations: dict[str, str]) -> dict[str, str]:
    """The pod, its namespace and the container's name, as CRI annotates a container's OCI spec
    (the kubelet's io.kubernetes.pod.* are CRI labels, which never reach the shim)."""
    found = {
        "pod": annotations.get(CRI_POD_NAME, ""),
        "pod_namespace": annotations.get(CRI_POD_NAMESPACE, ""),
        "container": annotations.get(CRI_CONTAINER_NAME, ""),
    }
    return {k: v for k, v in found.items() if v}


def premounted_rootfs(bundle: str) -> mounts.MountInfo | None:
    """The overlay already mounted at the spec's root (dockerd mounts the rootfs itself and passes no
    rootfs mounts in CreateTaskRequest), or None when there is none."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            root = (json.load(f).get("root") or {}).get("path") or "rootfs"
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"cannot read the bundle's config.json: {e}") from None
    if not isinstance(root, str):
        raise InvalidArgument(f"the bundle's root.path is not a string: {root!r}")
    try:
        overlay = mounts.overlay_at(os.path.join(bundle, root))  # an absolute root.path replaces the bundle
        if overlay is not None:
            mounts.overlay_remount_data(overlay)  # a restore unmounts it: it must mount again
        return overlay
    except ValueError as e:
        raise FailedPrecondition(f"cannot carry the writable layer: {e}") from None


class ProtectionManager:
    def __init__(
        self,
        namespace: str,
        socket_address: str,
        publish: Callable[[str, str], None] | None = None,
        node: NodeConfig | None = None,
        engine: CheckpointEngine | None = None,
        grpc_address: str = "",
    ) -> None:
        self.namespace = namespace
        self.address = socket_address
        # containerd's gRPC socket, to ask which image a container runs. containerd 1.6 passes it only
        # as the shim's -address flag (GRPC_ADDRESS in the environment came with 1.7).
        self.grpc_address = grpc_address or os.environ.get("GRPC_ADDRESS", "")
        self.publish = publish
        self._node = node
        self.engine = engine or CheckpointEngine()
        self.restorer = Restorer()
        self._protected: dict[str, Protected] = {}
        # Per checkpoint key, the attempts this shim ran: one shim serves one pod, so a key seen
        # again is the kubelet restarting the container in its pod.
        self._history: dict[str, KeyHistory] = {}
        self._lock = threading.Lock()
        self._swept = False

    @property
    def node(self) -> NodeConfig:
        if self._node is None:
            self._node = load_node_config()
        return self._node

    @property
    def run_dir(self) -> Path:
        return Path(os.environ.get(registry.RUN_DIR_ENV) or self.node.run_dir)

    def last_stats(self, cid: str) -> dict[str, Any] | None:
        """The statistics of the newest checkpoint of `cid` in this shim (ctr's or protection's)."""
        return self.engine.last_stats(cid)

    def get(self, cid: str) -> Protected | None:
        with self._lock:
            return self._protected.get(cid)

    # -- Create ----------------------------------------------------------------------------------
    def before_create(self, c: ContainerControl, requested_checkpoint: str) -> RestorePlan | None:
        """Called before the rootfs is mounted (the upper dir may be filled from a checkpoint)."""
        annotations = bundle_annotations(c.bundle)
        try:
            protection = protection_for(annotations, self.node)
            restart_policy = RestartPolicy.from_annotations(annotations) if protection else RestartPolicy()
        except PolicyError as e:
            raise InvalidArgument(str(e)) from None
        if protection is None:
            return None
        self._refuse_second_claim(c.id, protection.key, protection.store)
        from shim.layer import upper_dir_of  # the tar codec loads only for protected containers

        if not self._swept:  # a killed shim's staged dumps and restore scratch hold a job's memory
            self._swept = True
            sweep_leftovers(self.node.staging_dir, self.node.scratch_dir)
        upper_dir, premounted = upper_dir_of(c.rootfs), None
        if upper_dir is None and not c.rootfs:
            premounted = premounted_rootfs(c.bundle)
            upper_dir = Path(premounted.super_option("upperdir") or "") if premounted else None
        # Asked of containerd in a child process, in parallel with the rest of Create and Start.
        image = ImageLookup(self.grpc_address, c.namespace, c.id) if self.grpc_address else None
        if image is None:
            log.warning(
                "%s/%s: image identity unknown (no containerd address); a restore cannot be checked "
                "against a changed image",
                c.namespace,
                c.id,
            )
        pc = ProtectedContainer(
            namespace=c.namespace,
            id=c.id,
            bundle=Path(c.bundle),
            protection=protection,
            runc=c.runc,
            upper_dir=upper_dir,
            image=image,
            extra_metadata=lambda: self._gpu_metadata(c.id),
        )
        p = Protected(
            pc, kubernetes=kubernetes_identity(annotations), restart_policy=restart_policy, premounted=premounted
        )
        with self._lock:
            self._protected[c.id] = p
        log.info(
            "%s/%s is protected: key %s, store %s, interval %ss, checkpoint-on-stop %s, keep %d",
            c.namespace,
            c.id,
            protection.key,
            protection.store,
            protection.interval_s,
            protection.checkpoint_on_stop,
            protection.keep,
        )
        if requested_checkpoint:
            return None  # an explicit create-from-checkpoint (ctr restore) wins over the store
        with self._lock:
            history = self._history.get(protection.key)
        if history is not None and history.last is not None and history.last.exited_at is not None:
            decision = decide(history, restart_policy)
            p.restart_reason = decision.reason
            log.warning("%s/%s (key %s): %s", c.namespace, c.id, protection.key, decision.reason)
            if not decision.restore:
                p.fresh_reason = decision.reason
                self._event(c.id, "fresh", decision.reason)
                return None
            p.tried_seqs.extend(sorted(decision.skip_seqs))
        return self._plan_restore(c, p, image)

    def _refuse_second_claim(self, cid: str, key: str, store: str) -> None:
        """Two live containers checkpointing under one key would interleave their checkpoints: the
        second one is refused, naming the first. Node-local (this shim, then the node registry);
        across nodes only the store can tell."""
        with self._lock:
            mine = [o for o in self._protected.values() if o.container.id != cid]
        for other in mine:
            oc = other.container
            if (oc.protection.key, oc.protection.store) == (key, store) and (
                other.attempt is None or other.attempt.exited_at is None
            ):
                raise FailedPrecondition(f"checkpoint key {key!r} is already claimed by {self._name(other)}")
        for rec in registry.list_tasks(self.run_dir):
            if rec.id == cid or (rec.key, rec.store) != (key, store) or not registry.is_live(rec):
                continue
            who = f"pod {rec.pod_namespace}/{rec.pod} container {rec.container}" if rec.pod else f"task {rec.ref}"
            raise FailedPrecondition(f"checkpoint key {key!r} is already claimed by {who} ({rec.ref}), still running")

    @staticmethod
    def _name(p: Protected) -> str:
        k, pc = p.kubernetes, p.container
        where = f"{pc.namespace}/{pc.id}"
        if k.get("pod"):
            return f"pod {k.get('pod_namespace', '')}/{k['pod']} container {k.get('container', '')} ({where})"
        return f"task {where}"

    def _plan_restore(
        self, c: ContainerControl, p: Protected, image: ImageIdentity | ImageLookup | None
    ) -> RestorePlan | None:
        """Fetch the newest usable checkpoint not tried yet (filling the upper dir): the plan to restore
        from it, or None to start fresh."""
        pc = p.container
        try:
            result = self.restorer.prepare(
                pc.protection,
                self.node.scratch_dir,
                pc.upper_dir,
                image,
                skip_seqs=p.tried_seqs,
                compatible=lambda meta: self._gpu_refusal(c.id, meta),
                fill=lambda ckpt, upper: self._unmounted(p, lambda: fill_upper_dir(ckpt, upper)),
                claim=lambda store: claim_key(pc, store),
                lazy=self.node.lazy_restore,
            )
        except RestoreUnavailable as e:
            raise Unavailable(f"{pc.protection.key}: checkpoints unreadable, not starting fresh: {e}") from None
        pc.keep_seqs = pc.keep_seqs | set(result.unused_seqs) | set(p.tried_seqs)
        if isinstance(result, NoUsableCheckpoint):
            p.plan = None
            if result.reasons:
                p.fresh_reason = str(result)
                log.warning("%s", result)
                self._event(c.id, "fresh", str(result))
            else:
                log.info("%s: no checkpoint yet, starting fresh", pc.protection.key)
            return None
        p.plan = result
        p.tried_seqs.append(result.seq)
        for reason in result.skipped:
            log.warning("skipped checkpoint: %s", reason)
        log.info(
            "%s/%s will restore from %s seq %d%s",
            c.namespace,
            c.id,
            result.key,
            result.seq,
            ", its memory lazily" if result.deferred is not None else "",
        )
        lazy = None
        if result.deferred is not None:
            lazy = LazyRestore(
                source=result,
                finished=lambda failure: self._lazy_finished(c.id, result, failure),
                running=result.job_running,
            )
        return RestorePlan(str(result.criu_dir), fall_back=True, lazy=lazy)

    def _lazy_finished(self, cid: str, plan: restorer.RestorePlan, failure: str | None) -> None:
        """A lazy restore's pages all arrived (or could not): its reader, store and scratch go now."""
        stats = plan.deferred.stats() if plan.deferred is not None else {}
        if failure is None:
            log.info("%s: lazy restore from %s@%d complete: %s", cid, plan.key, plan.seq, stats)
        else:
            log.error("%s: lazy restore from %s@%d failed: %s", cid, plan.key, plan.seq, failure)
            self._event(cid, "lazy-restore-failed", failure)
        plan.discard()

    @staticmethod
    def _unmounted(p: Protected, change: Callable[[], Any]) -> Any:
        """Change the upper dir with its overlay unmounted: overlayfs does not see changes made under a
        mounted overlay, and the filled dir replaces the upper dir by a rename. A rootfs the shim mounts
        itself is not mounted yet here; one dockerd mounted is unmounted and mounted again as it was."""
        if p.premounted is None:
            return change()
        mounts.unmount_busy_fails(p.premounted.mount_point)
        try:
            return change()
        finally:
            try:
                mounts.remount_overlay(p.premounted)
            except OSError as e:  # the task cannot run on an empty root: say so, Create fails after this
                log.error("cannot mount the rootfs overlay at %s again: %s", p.premounted.mount_point, e)
                raise

    def _gpu_metadata(self, cid: str) -> dict[str, Any]:
        """The GPU part of the dump just taken (None for a CPU-only task), for the checkpoint's metadata."""
        take = getattr(self.engine.hooks, "take_metadata", None)
        return {"gpu": take(cid) if take else None}

    def _gpu_refusal(self, cid: str, metadata: dict[str, Any]) -> str | None:
        """Why this node cannot take a checkpoint's GPU state (other GPU model or count), or None."""
        expect = getattr(self.engine.hooks, "expect_restore", None)
        if expect is None or not metadata.get("gpu"):
            return None  # a CPU-only checkpoint restores anywhere
        try:
            expect(cid, metadata.get("gpu"))
        except Exception as e:  # GpuIncompatible, or no GPU support on a node asked to restore GPU state
            return str(e)
        return None

    # -- Start -----------------------------------------------------------------------------------
    def restore_failed(self, c: ContainerControl, error: Exception) -> RestorePlan | None:
        """A store checkpoint failed to restore (the rootfs is unmounted now): prepare the next one.
        Its plan, or None: no checkpoint left, start fresh."""
        p = self.get(c.id)
        assert p is not None and p.plan is not None, "restore_failed for a plan protection did not make"
        failed = p.plan
        log.warning("restore of %s seq %d failed, falling back: %s", failed.key, failed.seq, error)
        failed.discard()
        if p.container.upper_dir is not None:
            upper = p.container.upper_dir
            self._unmounted(p, lambda: clear_upper_dir(upper))
        plan = self._plan_restore(c, p, p.container.image)
        if plan is None:
            reason = f"checkpoint {failed.key}@{failed.seq} did not restore ({error})"
            p.fresh_reason = f"{p.fresh_reason}; {reason}" if p.fresh_reason else reason
            self._event(c.id, "fresh", p.fresh_reason)
        return plan

    def started(self, c: ContainerControl) -> None:
        p = self.get(c.id)
        if p is None:
            return
        pc = p.container
        pc.init_pid = c.init_pid
        pc.pause, pc.resume = c.pause_for_checkpoint, c.resume_after_checkpoint
        if p.plan is not None:
            p.restored_from = p.plan.seq
            p.restore_breakdown = restore_breakdown(p.plan.timings, self.engine.take_restore(c.id))
            log.info("restore of %s/%s from seq %d: %s", c.namespace, c.id, p.plan.seq, describe(p.restore_breakdown))
            detail = f"{pc.protection.key}@{p.plan.seq}"
            self._event(c.id, "restored", f"{detail} ({p.restart_reason})" if p.restart_reason else detail)
            if p.plan.deferred is None:  # a lazy plan is discarded when its last page arrived
                p.plan.discard()
            p.plan = None
        p.attempt = Attempt(started_at=time.time(), restored_from=p.restored_from)
        with self._lock:
            self._history.setdefault(pc.protection.key, KeyHistory()).last = p.attempt
        self._start_periodic(c, p)
        self._write_record(p)
        # Take the key's owner epoch now, not at the first checkpoint: an old owner cut off by a partition
        # is fenced at once. In the background (it is a store round trip); a checkpoint claims if this fails.
        threading.Thread(target=self._claim_key, args=(pc,), name=f"claim-{c.id}", daemon=True).start()

    @staticmethod
    def _claim_key(pc: ProtectedContainer) -> None:
        if pc.epoch is not None:
            return  # a restore claimed the key before listing its checkpoints: no second store client
        from shim.store import open_store

        try:
            with open_store(pc.protection.store) as store:
                claim_key(pc, store)
        except Exception as e:  # the store may be down now; the first checkpoint claims then
            log.warning("%s/%s: cannot claim key %s yet: %s", pc.namespace, pc.id, pc.protection.key, e)

    def _start_periodic(self, c: ContainerControl, p: Protected) -> None:
        if p.container.protection.interval_s > 0:
            p.periodic = PeriodicCheckpoints(
                f"{c.namespace}/{c.id}",
                p.container.protection.interval_s,
                lambda: self.checkpoint(c.id, exit=False, reason="periodic"),
            )
            p.periodic.start()

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoint(self, cid: str, *, exit: bool, reason: str, timeout_s: float | None = None) -> CheckpointReport:
        p = self.get(cid)
        if p is None:
            raise NotFound(f"container {cid} is not protected by revenant (no checkpoint key)")
        pc = p.container
        if not pc.init_pid:
            raise FailedPrecondition(f"{cid} has not started")
        deadline = time.monotonic() + timeout_s if timeout_s else None
        if not p.busy.acquire(timeout=timeout_s if timeout_s else -1):
            raise FailedPrecondition(f"a checkpoint of {cid} is still running")
        try:
            if deadline is not None and time.monotonic() >= deadline:
                raise RevenantError(f"no time left to checkpoint {cid}")
            report = Checkpointer(self.engine, self.node).take(pc, exit=exit, reason=reason)
        except (CheckpointError, OSError, ValueError) as e:
            p.last_error = f"{reason} checkpoint failed: {e}"
            self._write_record(p)
            raise RevenantError(p.last_error) from None
        except Exception as e:  # store errors and the like: report, keep the task protected
            p.last_error = f"{reason} checkpoint failed: {type(e).__name__}: {e}"
            if isinstance(e, Fenced):
                # Another node claimed the key (it restored this job after a partition): this copy
                # must not write under the key again, and periodic attempts would only be refused.
                log.error("%s/%s: %s; periodic checkpoints stop", pc.namespace, cid, e)
                if p.periodic is not None:
                    p.periodic.stop()
            self._write_record(p)
            raise RevenantError(p.last_error) from None
        finally:
            p.busy.release()
        p.last_report, p.last_committed_at, p.last_error = report, time.time(), None
        if p.attempt is not None:
            p.attempt.committed.append(report.seq)
        if exit and p.periodic is not None:
            # The task is gone after a final checkpoint: later periodic ones could only fail and
            # overwrite the record's last_error with noise.
            p.periodic.stop()
        self._write_record(p)
        return report

    def before_kill(self, c: ContainerControl, sig: int) -> bool:
        """Final checkpoint on a stop signal when asked for; True when it already stopped the task.

        If it fails the task runs on (the checkpointer thawed it) and a SIGTERM/SIGINT fails with the
        reason, to be retried; only SIGKILL stops the job without it, and says so."""
        p = self.get(c.id)
        if p is None or not p.container.protection.checkpoint_on_stop or sig not in STOP_SIGNALS:
            return False
        if p.periodic is not None:
            p.periodic.stop()
        try:
            self.checkpoint(c.id, exit=True, reason=f"stop signal {sig}", timeout_s=self.node.stop_deadline_s)
        except RevenantError as e:
            if sig == signal.SIGKILL:
                log.error("final checkpoint of %s failed; SIGKILL stops it without one: %s", c.id, e)
                return False
            self._start_periodic(c, p)
            raise Unavailable(
                f"{c.id} keeps running: its final checkpoint failed ({e}); stop it again to retry, or "
                "SIGKILL stops it without a final checkpoint"
            ) from None
        return True

    # -- Exit ------------------------------------------------------------------------------------
    def exited(self, cid: str, status: int, at: float) -> None:
        """The container's init process ended: close its attempt (the crash-loop guard counts it)."""
        p = self.get(cid)
        if p is None or p.attempt is None or p.attempt.exited_at is not None:
            return
        if p.periodic is not None:
            p.periodic.stop()
        p.attempt.exited_at, p.attempt.exit_status = at, status
        with self._lock:
            history = self._history.setdefault(p.container.protection.key, KeyHistory())
            history.ended(p.attempt, p.restart_policy.window_s)
        log.info(
            "%s/%s (key %s) exited with status %d after %.1fs",
            p.container.namespace,
            cid,
            p.container.protection.key,
            status,
            p.attempt.ran_s,
        )
        self._write_record(p)

    # -- Delete ----------------------------------------------------------------------------------
    def deleted(self, c: ContainerControl) -> None:
        """Called for every deleted container, protected or not."""
        cid = c.id
        self.engine.forget(cid)
        with self._lock:
            p = self._protected.pop(cid, None)
        if p is None:
            return
        if p.periodic is not None:
            p.periodic.stop()
        if p.plan is not None:
            p.plan.discard()
        with p.record_lock:
            p.gone = True
            registry.remove_task(self.run_dir, p.container.namespace, cid)

    # -- registry, events ---------------------------------------------------------------
    def record(self, p: Protected) -> registry.TaskRecord:
        pc = p.container
        last = None
        if p.last_report is not None:
            last = registry.LastCheckpoint(
                seq=p.last_report.seq,
                time=p.last_committed_at,
                bytes_uploaded=p.last_report.bytes_uploaded,
                duration_s=p.last_report.total_s,
            )
        return registry.TaskRecord(
            namespace=pc.namespace,
            id=pc.id,
            address=self.address,
            key=pc.protection.key,
            store=pc.protection.store,
            interval_s=pc.protection.interval_s,
            checkpoint_on_stop=pc.protection.checkpoint_on_stop,
            keep=pc.protection.keep,
            shim_pid=os.getpid(),
            task_pid=pc.init_pid,
            last_checkpoint=last,
            last_error=p.last_error,
            extra={
                "restored_from": p.restored_from,
                "restore": p.restore_breakdown,
                "fresh_reason": p.fresh_reason,
                "restart_reason": p.restart_reason,
                "exited_at": p.attempt.exited_at if p.attempt else None,
            },
            **p.kubernetes,
        )

    def _write_record(self, p: Protected) -> None:
        try:
            with p.record_lock:
                if not p.gone:
                    registry.write_task(self.run_dir, self.record(p))
        except OSError as e:
            log.warning("cannot write the registry record of %s: %s", p.container.id, e)

    def _event(self, cid: str, what: str, detail: str) -> None:
        if self.publish is not None:
            self.publish(RESTORE_TOPIC, json.dumps({"container_id": cid, "outcome": what, "detail": detail}))
