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

import pytest

from .images import PAUSE_REF
from .tools import SYSTEM_PATH, end_process, require
from .wait import wait_until

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CRI_DROPIN_V2 = REPO / "packaging" / "containerd" / "revenant-cri-v2.toml"
CRI_NAMESPACE = "k8s.io"
# Each version's binaries (containerd, ctr, containerd-shim-runc-v2): the system's 1.6, and 1.7 unpacked
# beside it by packaging/install-deps.sh.
CONTAINERD_BIN_DIRS = {"1.6": None, "1.7": Path("/opt/revenant-test/containerd-1.7/usr/bin")}

# Distinct per checkout when several suites run at once: containerd puts a task in cgroup /<namespace>/<id>.
NAMESPACE = os.environ.get("REVENANT_TEST_NAMESPACE", "revenant-test")
VENV_BIN = Path(sys.executable).parent


def _cri_config(node: ContainerdNode) -> str:
    """The CRI plugin as a node runs it: the local pause image, its own CNI network, runc with a runc root
    of its own, and revenant's handler appended from the shipped fragment (as an operator does)."""
    return f"""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{node.pause_ref}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{node.cni_conf_dir}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
    Root = "{node.runc_root}"

{CRI_DROPIN_V2.read_text()}"""


def _config(node: ContainerdNode, extra: str) -> str:
    return f"""version = 2
root = "{node.root}"
state = "{node.state}"
{"" if node.cri else 'disabled_plugins = ["io.containerd.grpc.v1.cri"]'}

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
{_cri_config(node) if node.cri else ""}
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

    def __init__(
        self,
        name: str,
        extra_config: str = "",
        *,
        cri: bool = False,
        version: str = "1.6",
        pause_ref: str = PAUSE_REF,
        subnet: str = "",
    ) -> None:
        if version not in CONTAINERD_BIN_DIRS:
            raise ValueError(f"no containerd {version} for tests (have {', '.join(CONTAINERD_BIN_DIRS)})")
        self.name = name
        self.cri = cri
        self.version = version
        self.pause_ref = pause_ref
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
        # containerd makes its checkpoint temp dirs (ctrd-checkpointN) here, not in the machine's /tmp:
        # one a killed node leaves behind goes with the node's directory.
        self.xdg_runtime_dir = self.dir / "xdg-run"
        self.xdg_runtime_dir.mkdir(mode=0o700)
        bin_dir = CONTAINERD_BIN_DIRS[version]
        self.env = {
            **os.environ,
            # The venv first (our shim), then the version's own binaries (its containerd-shim-runc-v2).
            "PATH": f"{VENV_BIN}:{f'{bin_dir}:' if bin_dir else ''}{SYSTEM_PATH}",
            "REVENANT_RUN_DIR": str(self.revenant_run_dir),
            "REVENANT_CONFIG": str(self.revenant_config),
            "XDG_RUNTIME_DIR": str(self.xdg_runtime_dir),
        }
        self._proc: subprocess.Popen[bytes] | None = None
        if bin_dir is None:
            self._containerd = require("containerd", "containerd")
            self._ctr = require("ctr", "containerd")
        else:
            self._containerd, self._ctr = str(bin_dir / "containerd"), str(bin_dir / "ctr")
            if not os.access(self._containerd, os.X_OK):
                pytest.fail(f"containerd {version} is not unpacked in {bin_dir}: run packaging/install-deps.sh")
        require("runc", "runc")
        # CNI: an isolated bridge per node, addresses from a private range, no gateway, no masquerade,
        # no routes: pods get an address and nothing leaves the host.
        self.cni_conf_dir = self.dir / "cni"
        self.bridge = f"rvbr{os.getpid() % 10000}{name[:3]}"[:15]
        self.subnet = subnet
        if cri:
            if not subnet:
                raise ValueError("a CRI node needs its own pod subnet")
            self._write_cni_config()
        self.config_path.write_text(_config(self, extra_config))
        self.revenant_scratch = self.dir / "revenant-scratch"
        self.write_revenant_config()

    def write_revenant_config(self, text: str | None = None, extra: str = "") -> None:
        """The node's revenant config (a shim reads it at its first Create). The default is a test node's:
        store URLs in annotations allowed, intervals down to 1s, scratch inside the node's directory;
        `extra` adds top-level settings to it."""
        if text is None:
            text = (
                f'{extra}\nallow_store_urls = true\nmin_checkpoint_interval = "1s"\n'
                f'scratch_dir = "{self.revenant_scratch}"\n'
            )
        self.revenant_config.write_text(text)

    def _write_cni_config(self) -> None:
        self.cni_conf_dir.mkdir(parents=True)
        conf = {
            "cniVersion": "0.4.0",
            "name": f"revenant-test-{self.bridge}",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": False,
                    "ipMasq": False,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": self.subnet}]],
                        "dataDir": str(self.dir / "cni-ipam"),
                    },
                },
                {"type": "loopback"},
            ],
        }
        (self.cni_conf_dir / "10-revenant-test.conflist").write_text(json.dumps(conf, indent=2))

    @property
    def cri_address(self) -> str:
        """CRI is served on containerd's own gRPC socket."""
        return self.address

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
        end_process(self._proc, timeout)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL containerd (a node dying); shims and containers stay as they were."""
        end_process(self._proc, None)
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
        if self.running and self.cri:
            self._remove_all_pods()
        if self.running:
            self._remove_all_tasks()
        self.stop()
        self._kill_leftover_processes()
        self._delete_runc_containers()
        self._unmount_all()
        if self.cri:  # the bridge outlives the pods (veths go with their network namespaces)
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        if keep_logs_in is not None:
            keep_logs_in.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copy(self.log_path, keep_logs_in / f"containerd-{self.name}.log")
        shutil.rmtree(self.dir, ignore_errors=True)

    def _remove_all_pods(self) -> None:
        """As the kubelet would: stop (CNI teardown) and remove every pod sandbox."""
        from .cri import CriClient

        try:
            with CriClient(self.cri_address) as cri:
                cri.remove_all_pods()
        except Exception as e:  # teardown goes on: the task sweep below kills the rest
            log.warning("node %s: removing pods through CRI failed: %s", self.name, e)

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
