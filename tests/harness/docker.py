"""A private dockerd per test module: Docker as a client of a harness containerd node and its shims.

dockerd comes from Debian 13's docker.io, unpacked by packaging/install-deps.sh into a directory of its
own (REVENANT_DOCKER_DIR, default /opt/revenant-test/docker), so the system's containerd and runc stay
as they are. Each daemon has its own data root, exec root, pidfile and socket, runs its containers under
the node's containerd (namespace `moby`) and changes nothing on the host's network (no bridge, no
iptables). Images come from the locally built OCI archives through `docker load`: nothing is pulled.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest

from .containerd import ContainerdNode
from .images import TestImages
from .tools import end_process
from .wait import wait_until

DOCKER_DIR = Path(os.environ.get("REVENANT_DOCKER_DIR", "/opt/revenant-test/docker"))
DOCKERD = DOCKER_DIR / "usr" / "sbin" / "dockerd"
DOCKER = DOCKER_DIR / "usr" / "bin" / "docker"
DOCKER_COMPOSE = DOCKER_DIR / "usr" / "bin" / "docker-compose"
DOCKER_NAMESPACE = "moby"
REVENANT_RUNTIME = "io.containerd.revenant.v1"
RUNC_RUNTIME = "runc"  # Docker's default runtime: containerd's runc shim with dockerd's own runc root
# The README's /etc/docker/daemon.json: a short name for revenant's runtime (the full name works without it).
DAEMON_JSON = {"runtimes": {"revenant": {"runtimeType": REVENANT_RUNTIME}}}


def require_docker() -> None:
    if not (DOCKERD.is_file() and DOCKER.is_file()):
        pytest.fail(
            f"dockerd is not in {DOCKER_DIR}: run `sudo packaging/install-deps.sh` (it unpacks Debian 13's "
            "docker.io and docker-cli there)",
            pytrace=False,
        )


def docker_loadable(oci_archive: Path, out: Path) -> Path:
    """The OCI layout archive plus the manifest.json `docker load` reads (dockerd 26 cannot load a plain
    OCI layout): the same blobs, so the image keeps its config digest (its ID) on every daemon."""
    with tarfile.open(oci_archive) as src:
        index = json.load(src.extractfile("index.json"))  # type: ignore[arg-type]
        desc = index["manifests"][0]
        manifest = json.load(src.extractfile(f"blobs/sha256/{desc['digest'].split(':', 1)[1]}"))  # type: ignore[arg-type]
        entry = {
            "Config": f"blobs/sha256/{manifest['config']['digest'].split(':', 1)[1]}",
            "RepoTags": [desc["annotations"]["io.containerd.image.name"]],
            "Layers": [f"blobs/sha256/{layer['digest'].split(':', 1)[1]}" for layer in manifest["layers"]],
        }
        data = json.dumps([entry]).encode()
        with tarfile.open(out, "w") as dst:
            for member in src.getmembers():
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
            info = tarfile.TarInfo("manifest.json")
            info.size = len(data)
            dst.addfile(info, fileobj=io.BytesIO(data))
    return out


class DockerDaemon:
    """One dockerd on a harness node. Paths stay short: unix socket paths are limited to 107 bytes."""

    def __init__(self, node: ContainerdNode, name: str = "docker") -> None:
        require_docker()
        self.node = node
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix=f"rv-{name}-", dir="/tmp"))
        self.data_root = self.dir / "data"
        self.exec_root = self.dir / "exec"
        self.socket = self.dir / "docker.sock"
        self.host = f"unix://{self.socket}"
        self.log_path = self.dir / "dockerd.log"
        # The node's PATH starts with the venv's bin (containerd-shim-revenant-v1); dockerd's own
        # helpers (docker-init, docker-proxy) come from its directory.
        self.env = {
            **node.env,
            "PATH": f"{DOCKER_DIR}/usr/bin:{DOCKER_DIR}/usr/sbin:{node.env['PATH']}",
            "DOCKER_HOST": self.host,
        }
        self.env.pop("DOCKER_CONTEXT", None)
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> DockerDaemon:
        config = self.dir / "daemon.json"
        config.write_text(json.dumps(DAEMON_JSON))
        cmd = [
            str(DOCKERD),
            "--config-file",
            str(config),
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(self.exec_root),
            "--pidfile",
            str(self.dir / "dockerd.pid"),
            "-H",
            self.host,
            "--containerd",
            self.node.address,
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--experimental",
            "--storage-driver",
            "overlay2",
            "--log-level",
            "debug",
        ]
        with open(self.log_path, "ab") as logf:
            self._proc = subprocess.Popen(
                cmd, stdout=logf, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        proc = self._proc
        wait_until(
            lambda: self.socket.exists() and self.docker("version", check=False, timeout=10).returncode == 0,
            timeout,
            f"dockerd {self.name} to answer",
            interval=0.2,
            abort=lambda: "it exited at start-up" if proc.poll() is not None else None,
            detail=self.log_tail,
        )
        return self

    def docker(
        self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(DOCKER), "-H", self.host, *args]
        res = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, input=input if input is not None else "", env=self.env
        )
        if check and res.returncode != 0:
            said = res.stderr.strip() or res.stdout.strip()
            raise RuntimeError(f"{shlex.join(cmd)} failed ({res.returncode}): {said}")
        return res

    def load(self, oci_archive: Path) -> str:
        """`docker load` a harness image archive; returns its reference."""
        loadable = docker_loadable(oci_archive, self.dir / f"load-{oci_archive.name}")
        try:
            out = self.docker("load", "-i", str(loadable), timeout=300).stdout
        finally:
            loadable.unlink(missing_ok=True)
        ref = out.strip().rsplit("Loaded image: ", 1)[-1].strip()
        if not ref:
            raise RuntimeError(f"docker load printed no image name: {out!r}")
        return ref

    def inspect(self, container: str) -> dict:
        return json.loads(self.docker("inspect", container).stdout)[0]

    def upper_dir(self, container: str) -> Path:
        """The container's writable layer as dockerd's overlay2 driver keeps it."""
        return Path(self.inspect(container)["GraphDriver"]["Data"]["UpperDir"])

    def bundle(self, container: str) -> Path:
        cid = self.inspect(container)["Id"]
        return self.node.bundle(cid, namespace=DOCKER_NAMESPACE)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def remove_all_containers(self) -> None:
        ids = self.docker("ps", "-aq", check=False, timeout=30).stdout.split()
        if ids:
            self.docker("rm", "-f", *ids, check=False, timeout=120)

    def stop(self, timeout: float = 30) -> None:
        end_process(self._proc, timeout)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL dockerd (a host dying along with its node)."""
        end_process(self._proc, None)
        self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def destroy(self, keep_logs_in: Path | None = None) -> None:
        """Remove every container, stop dockerd, unmount what it left and remove its directories."""
        if self.running:
            self.remove_all_containers()
        self.stop()
        prefix = str(self.dir) + "/"
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4].replace("\\040", " ") for line in f]
        for mp in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], capture_output=True)
        if keep_logs_in is not None:
            keep_logs_in.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copy(self.log_path, keep_logs_in / f"dockerd-{self.name}.log")
        shutil.rmtree(self.dir, ignore_errors=True)


class DockerHost:
    """A node and its dockerd, with the test images loaded: one "host" a Docker user has."""

    def __init__(self, name: str, images: TestImages, failed_logs: Path | None = None) -> None:
        self.node = ContainerdNode(name)
        self.node.start()
        self.docker_daemon = DockerDaemon(self.node, f"{name}-docker")
        try:
            self.docker_daemon.start()
            self.busybox = self.docker_daemon.load(images.busybox)
            self.memjob = self.docker_daemon.load(images.memjob)
        except BaseException:
            self.destroy(failed_logs / f"docker-host-{name}" if failed_logs else None)
            raise

    def docker(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.docker_daemon.docker(*args, **kw)

    def inspect_restarts(self, container: str) -> int:
        return int(self.docker("inspect", "-f", "{{.RestartCount}}", container).stdout.strip())

    def destroy(self, keep_logs_in: Path | None = None) -> None:
        self.docker_daemon.destroy(keep_logs_in)
        self.node.destroy(keep_logs_in)
