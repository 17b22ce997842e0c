"""A private containerd per test ("node"): its own config, root, state, sockets and runc roots.

Two nodes side by side simulate two spot nodes. Each node's containerd finds runtime shims on a PATH
whose first entry is this tree's virtualenv `bin/`, so `io.containerd.revenant.v1` runs the code
under test, never an installed copy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .tools import SYSTEM_PATH, require
from .wait import wait_until

log = logging.getLogger(__name__)

# Distinct per checkout when several suites run at once: containerd puts a task in cgroup /<namespace>/<id>.
NAMESPACE = os.environ.get("REVENANT_TEST_NAMESPACE", "revenant-test")
VENV_BIN = Path(sys.executable).parent


def _config(node: ContainerdNode, extra: str) -> str:
    return f"""version = 2
root = "{node.root}"
state = "{node.state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{node.address}"

[ttrpc]
  address = "{node.ttrpc_address}"

[debug]
  level = "debug"

[proxy_plugins.revenant]
  type = "snapshot"
  address = "{node.snapshotter_address}"
{extra}
"""


def image_ref_of(archive: Path) -> str:
    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        if member is None:
            raise ValueError(f"{archive} has no index.json")
        index = json.load(member)
    return index["manifests"][0]["annotations"]["io.containerd.image.name"]


class ContainerdNode:
    """One containerd instance. Paths stay short: unix socket paths are limited to 107 bytes."""

    def __init__(self, name: str, extra_config: str = "") -> None:
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix=f"rv-{name}-", dir="/tmp"))
        self.root = self.dir / "root"
        self.state = self.dir / "state"
        self.address = str(self.dir / "containerd.sock")
        self.ttrpc_address = self.address + ".ttrpc"
        self.snapshotter_address = str(self.dir / "snapshotter.sock")
        self.runc_root = self.dir / "runc"  # for the stock runc shim: `ctr run --runc-root`
        self.config_path = self.dir / "config.toml"
        self.log_path = self.dir / "containerd.log"
        self.namespace = NAMESPACE
        # revenant's node-level state (registry of protected tasks, node config) stays inside the node.
        self.revenant_run_dir = self.dir / "revenant-run"
        self.revenant_config = self.dir / "revenant.toml"
        self.env = {
            **os.environ,
            "PATH": f"{VENV_BIN}:{SYSTEM_PATH}",
            "REVENANT_RUN_DIR": str(self.revenant_run_dir),
            "REVENANT_CONFIG": str(self.revenant_config),
        }
        self._proc: subprocess.Popen[bytes] | None = None
        self._containerd = require("containerd", "containerd")
        self._ctr = require("ctr", "containerd")
        require("runc", "runc")
        self.config_path.write_text(_config(self, extra_config))

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout: float = 30) -> None:
        with open(self.log_path, "ab") as logf:
            self._proc = subprocess.Popen(
                [self._containerd, "--config", str(self.config_path)],
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        proc = self._proc
        wait_until(
            lambda: os.path.exists(self.address) and self.ctr("version", check=False, timeout=5).returncode == 0,
            timeout,
            f"containerd {self.name} to answer",
            abort=lambda: "it exited at start-up" if proc.poll() is not None else None,
            detail=self.log_tail,
        )

    def stop(self, timeout: float = 15) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL containerd (a node dying); shims and containers stay as they were."""
        if self._proc and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- clients -------------------------------------------------------------------------------
    def ctr(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 120,
        input: str | None = None,
        namespace: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        cmd = [self._ctr, "-a", self.address, "-n", namespace or self.namespace, *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input, env=self.env)
        if check and res.returncode != 0:
            raise subprocess.CalledProcessError(res.returncode, cmd, res.stdout, res.stderr)
        return res

    def import_image(self, archive: Path, *extra: str) -> str:
        """Import an OCI archive (unpacked into the default snapshotter); returns its image ref."""
        self.ctr("images", "import", *extra, str(archive), timeout=300)
        return image_ref_of(archive)

    def bundle(self, container_id: str, namespace: str | None = None) -> Path:
        return self.state / "io.containerd.runtime.v2.task" / (namespace or self.namespace) / container_id

    def rootfs(self, container_id: str) -> Path:
        return self.bundle(container_id) / "rootfs"

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- teardown ------------------------------------------------------------------------------
    def destroy(self, keep_logs_in: Path | None = None) -> None:
        """Kill every task, stop containerd, reap leftovers, unmount and remove the node's files."""
        if self.running:
            self._remove_all_tasks()
        self.stop()
        self._kill_leftover_processes()
        self._delete_runc_containers()
        self._unmount_all()
        if keep_logs_in is not None:
            keep_logs_in.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copy(self.log_path, keep_logs_in / f"containerd-{self.name}.log")
        shutil.rmtree(self.dir, ignore_errors=True)

    def _namespaces(self) -> list[str]:
        res = self.ctr("namespaces", "ls", "-q", check=False, timeout=15)
        return res.stdout.split() if res.returncode == 0 else [self.namespace]

    def _remove_all_tasks(self) -> None:
        for ns in self._namespaces():
            tasks = self.ctr("tasks", "ls", "-q", check=False, timeout=15, namespace=ns).stdout.split()
            for task in tasks:
                self.ctr("tasks", "kill", "-a", "-s", "SIGKILL", task, check=False, timeout=15, namespace=ns)
            for task in tasks:
                self.ctr("tasks", "rm", "-f", task, check=False, timeout=30, namespace=ns)
            for c in self.ctr("containers", "ls", "-q", check=False, timeout=15, namespace=ns).stdout.split():
                self.ctr("containers", "rm", c, check=False, timeout=30, namespace=ns)

    def _kill_leftover_processes(self) -> None:
        """Shims (and anything else) started for this node carry its socket path on their command line."""
        marker = self.address.encode()
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
                continue
            try:
                cmdline = (pid_dir / "cmdline").read_bytes()
            except OSError:
                continue
            if marker in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid_dir.name), signal.SIGKILL)

    # -- what the node has left: also what tests check after a failure path ---------------------
    def mounts(self) -> list[str]:
        """Mount points under the node's directory."""
        prefix = str(self.dir) + "/"
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4].replace("\\040", " ") for line in f]
        return [p for p in points if p.startswith(prefix)]

    def runc_roots(self) -> set[Path]:
        """Every runc state root under the node (the stock shim's --runc-root and revenant's own)."""
        roots: set[Path] = set()
        # os.walk ignores entries that vanish mid-walk (a shim may still be deleting its files).
        for dirpath, _dirs, files in os.walk(self.dir):
            if "state.json" in files and "rootfs" not in Path(dirpath).parts:
                roots.add(Path(dirpath).parent)
        return roots

    def runc_containers(self) -> dict[str, Path]:
        """Container ids runc still knows under the node, with their runc root."""
        runc = require("runc", "runc")
        found: dict[str, Path] = {}
        for root in self.runc_roots():
            ids = subprocess.run([runc, "--root", str(root), "list", "-q"], capture_output=True, text=True)
            found.update(dict.fromkeys(ids.stdout.split(), root))
        return found

    def _delete_runc_containers(self) -> None:
        """Containers whose shim died stay in runc's state."""
        runc = require("runc", "runc")
        for cid, root in self.runc_containers().items():
            subprocess.run([runc, "--root", str(root), "kill", "-a", cid, "KILL"], capture_output=True)
            subprocess.run([runc, "--root", str(root), "delete", "-f", cid], capture_output=True)

    def _unmount_all(self) -> None:
        for mp in sorted(self.mounts(), key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], capture_output=True)
