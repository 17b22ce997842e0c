"""A small CRI client (runtime.v1 over gRPC) that drives containerd's CRI plugin the way the kubelet does:
RunPodSandbox with a runtime handler, image status, CreateContainer/StartContainer, status, exec, log
reopen, stats, stop and remove; and re-creation after an exit with the next attempt number.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from revenant_pb.k8s.cri.v1 import api_pb2 as cri
from revenant_pb.k8s.cri.v1 import api_pb2_grpc as cri_grpc

from .containerd import NAMESPACE
from .wait import wait_until

RUNNING, EXITED = cri.CONTAINER_RUNNING, cri.CONTAINER_EXITED


@dataclass
class PodSpec:
    """What the kubelet puts in a PodSandboxConfig (a Pod's name, namespace, uid, annotations)."""

    name: str
    namespace: str = "default"
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    annotations: dict[str, str] = field(default_factory=dict)
    attempt: int = 0
    log_directory: str = ""

    def config(self) -> cri.PodSandboxConfig:
        conf = cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(
                name=self.name, namespace=self.namespace, uid=self.uid, attempt=self.attempt
            ),
            hostname=self.name,
            log_directory=self.log_directory,
            labels={"io.kubernetes.pod.name": self.name, "io.kubernetes.pod.namespace": self.namespace},
            annotations=self.annotations,
        )
        # A cgroup parent per pod under this checkout's test namespace (cgroupfs driver), as the kubelet's
        # /kubepods/.../pod<uid>: suites running side by side never share one.
        conf.linux.cgroup_parent = f"/{NAMESPACE}-cri/pod{self.uid}"
        conf.linux.security_context.namespace_options.pid = cri.CONTAINER
        return conf


@dataclass
class ContainerSpec:
    name: str
    image: str
    command: Sequence[str] = ()
    args: Sequence[str] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    memory_limit: int = 0
    attempt: int = 0
    envs: Mapping[str, str] = field(default_factory=dict)

    def config(self, pod: PodSpec) -> cri.ContainerConfig:
        conf = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=self.name, attempt=self.attempt),
            image=cri.ImageSpec(image=self.image),
            command=list(self.command),
            args=list(self.args),
            envs=[cri.KeyValue(key=k, value=v) for k, v in self.envs.items()],
            labels={
                "io.kubernetes.pod.name": pod.name,
                "io.kubernetes.pod.namespace": pod.namespace,
                "io.kubernetes.container.name": self.name,
            },
            annotations=dict(self.annotations),
            # The kubelet's layout: <log_directory>/<container>/<attempt>.log
            log_path=f"{self.name}/{self.attempt}.log",
        )
        if self.memory_limit:
            conf.linux.resources.memory_limit_in_bytes = self.memory_limit
        conf.linux.security_context.namespace_options.pid = cri.CONTAINER
        return conf


class CriClient:
    def __init__(self, address: str, timeout: float = 120) -> None:
        self.timeout = timeout
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.runtime = cri_grpc.RuntimeServiceStub(self.channel)
        self.images = cri_grpc.ImageServiceStub(self.channel)

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    # -- runtime -----------------------------------------------------------------------------------
    def version(self) -> cri.VersionResponse:
        return self.runtime.Version(cri.VersionRequest(version="v1"), timeout=self.timeout)

    def run_pod(self, pod: PodSpec, handler: str) -> str:
        req = cri.RunPodSandboxRequest(config=pod.config(), runtime_handler=handler)
        return self.runtime.RunPodSandbox(req, timeout=self.timeout).pod_sandbox_id

    def pod_status(self, pod_id: str, verbose: bool = False) -> cri.PodSandboxStatusResponse:
        req = cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose)
        return self.runtime.PodSandboxStatus(req, timeout=self.timeout)

    def pod_ip(self, pod_id: str) -> str:
        return self.pod_status(pod_id).status.network.ip

    def stop_pod(self, pod_id: str) -> None:
        self.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=self.timeout)

    def remove_pod(self, pod_id: str) -> None:
        self.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=self.timeout)

    def create_container(self, pod_id: str, pod: PodSpec, spec: ContainerSpec) -> str:
        req = cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=spec.config(pod), sandbox_config=pod.config())
        return self.runtime.CreateContainer(req, timeout=self.timeout).container_id

    def start_container(self, cid: str) -> None:
        self.runtime.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=self.timeout)

    def status(self, cid: str, verbose: bool = False) -> cri.ContainerStatus:
        req = cri.ContainerStatusRequest(container_id=cid, verbose=verbose)
        return self.runtime.ContainerStatus(req, timeout=self.timeout).status

    def list_containers(self, pod_id: str = "") -> list[cri.Container]:
        req = cri.ListContainersRequest(filter=cri.ContainerFilter(pod_sandbox_id=pod_id))
        return list(self.runtime.ListContainers(req, timeout=self.timeout).containers)

    def exec_sync(self, cid: str, cmd: Sequence[str], timeout_s: int = 30) -> cri.ExecSyncResponse:
        req = cri.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=timeout_s)
        return self.runtime.ExecSync(req, timeout=self.timeout)

    def reopen_log(self, cid: str) -> None:
        self.runtime.ReopenContainerLog(cri.ReopenContainerLogRequest(container_id=cid), timeout=self.timeout)

    def stats(self, pod_id: str = "", cid: str = "") -> list[cri.ContainerStats]:
        req = cri.ListContainerStatsRequest(filter=cri.ContainerStatsFilter(id=cid, pod_sandbox_id=pod_id))
        return list(self.runtime.ListContainerStats(req, timeout=self.timeout).stats)

    def stop_container(self, cid: str, timeout_s: int = 10) -> None:
        req = cri.StopContainerRequest(container_id=cid, timeout=timeout_s)
        self.runtime.StopContainer(req, timeout=self.timeout + timeout_s)

    def remove_container(self, cid: str) -> None:
        self.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=cid), timeout=self.timeout)

    # -- images ------------------------------------------------------------------------------------
    def image_present(self, ref: str) -> bool:
        req = cri.ImageStatusRequest(image=cri.ImageSpec(image=ref))
        return bool(self.images.ImageStatus(req, timeout=self.timeout).image.id)

    def pull_image(self, ref: str) -> str:
        req = cri.PullImageRequest(image=cri.ImageSpec(image=ref))
        return self.images.PullImage(req, timeout=self.timeout).image_ref

    # -- the kubelet's sequences -------------------------------------------------------------------
    def wait_state(self, cid: str, state: int, timeout: float = 60) -> cri.ContainerStatus:
        last: list[cri.ContainerStatus] = []

        def reached() -> cri.ContainerStatus | None:
            last[:] = [self.status(cid)]
            return last[0] if last[0].state == state else None

        return wait_until(
            reached,
            timeout,
            f"container {cid} to be {cri.ContainerState.Name(state)}",
            detail=lambda: f"it is {cri.ContainerState.Name(last[0].state)}" if last else "",
        )

    def start_pod(self, pod: PodSpec, handler: str, containers: Sequence[ContainerSpec]) -> tuple[str, list[str]]:
        """RunPodSandbox, then create and start each container: the kubelet's SyncPod for a new pod."""
        pod_id = self.run_pod(pod, handler)
        ids = []
        for spec in containers:
            if not self.image_present(spec.image):
                self.pull_image(spec.image)
            cid = self.create_container(pod_id, pod, spec)
            self.start_container(cid)
            ids.append(cid)
        return pod_id, ids

    def restart(self, pod_id: str, pod: PodSpec, spec: ContainerSpec, old_cid: str) -> tuple[str, ContainerSpec]:
        """The kubelet's restart of an exited container: remove it, create the next attempt, start it."""
        self.remove_container(old_cid)
        nxt = ContainerSpec(**{**spec.__dict__, "attempt": spec.attempt + 1})
        cid = self.create_container(pod_id, pod, nxt)
        self.start_container(cid)
        return cid, nxt

    def teardown_pod(self, pod_id: str) -> None:
        for c in self.list_containers(pod_id):
            self.stop_container(c.id, timeout_s=0)
            self.remove_container(c.id)
        self.stop_pod(pod_id)
        self.remove_pod(pod_id)

    def list_pods(self) -> list[cri.PodSandbox]:
        return list(self.runtime.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=self.timeout).items)

    def remove_all_pods(self) -> None:
        for p in self.list_pods():
            self.teardown_pod(p.id)


def read_cri_log(path: Path) -> list[tuple[str, str, str, str]]:
    """The CRI log format: `<RFC3339Nano timestamp> <stream> <P|F> <content>` per line."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        ts, stream, tag, content = [*line.split(" ", 3), ""][:4]
        out.append((ts, stream, tag, content))
    return out
