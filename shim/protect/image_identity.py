"""Which image a container runs, asked of containerd itself (its gRPC socket, GRPC_ADDRESS).

A checkpoint records the image's content digest; a restore onto a container whose image differs
would run old memory against new binaries, so it starts fresh instead and says why.

The shim asks in a short-lived child process (`python -m shim.protect.image_identity`): gRPC is the
only thing in the shim that needs it, and loading grpc into a long-lived shim costs ~15 MiB of
resident memory and its worker threads for the shim's whole life, once per pod under Kubernetes.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)

GRPC_NAMESPACE_KEY = "containerd-namespace"


@dataclass(frozen=True)
class ImageIdentity:
    name: str
    digest: str  # the image's target (manifest or index) digest; "" when containerd has no image record
    base: str = ""  # parent (chain ID) of the container's rootfs snapshot: what the writable layer sits on

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "digest": self.digest, "base": self.base}

    def differs_from(self, recorded: dict[str, str] | None) -> str | None:
        """Why a checkpoint taken on `recorded` must not be restored onto this image, or None.

        Strict: a checkpoint that records no image, or lacks a field this container has (or has one
        it lacks), is another image's as far as anyone can tell."""
        if not recorded or not isinstance(recorded, dict):
            return f"the checkpoint records no image (this container runs {self.name or '?'})"
        for field_name in ("digest", "base"):
            was, now = str(recorded.get(field_name) or ""), getattr(self, field_name)
            if was != now:
                return (
                    f"the image differs from the checkpoint's ({field_name} {was or 'unknown'} at checkpoint, "
                    f"{now or 'unknown'} now; image {recorded.get('name', '?')} -> {self.name})"
                )
        return None


def image_of(grpc_address: str, namespace: str, container_id: str, timeout: float = 10.0) -> ImageIdentity | None:
    """The container's image name and digest, or None when containerd cannot say (logged)."""
    import grpc

    from revenant_pb.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
    from revenant_pb.containerd.services.images.v1 import images_pb2, images_pb2_grpc
    from revenant_pb.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc

    target = grpc_address if grpc_address.startswith("unix:") else f"unix://{grpc_address}"
    metadata = ((GRPC_NAMESPACE_KEY, namespace),)
    try:
        with grpc.insecure_channel(target) as channel:
            container = (
                containers_pb2_grpc.ContainersStub(channel)
                .Get(containers_pb2.GetContainerRequest(id=container_id), metadata=metadata, timeout=timeout)
                .container
            )
            base = ""
            if container.snapshotter and container.snapshot_key:
                base = (
                    snapshots_pb2_grpc.SnapshotsStub(channel)
                    .Stat(
                        snapshots_pb2.StatSnapshotRequest(
                            snapshotter=container.snapshotter, key=container.snapshot_key
                        ),
                        metadata=metadata,
                        timeout=timeout,
                    )
                    .info.parent
                )
            digest = ""
            if container.image:
                try:
                    digest = (
                        images_pb2_grpc.ImagesStub(channel)
                        .Get(images_pb2.GetImageRequest(name=container.image), metadata=metadata, timeout=timeout)
                        .image.target.digest
                    )
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.NOT_FOUND:
                        raise
            return ImageIdentity(container.image, digest, base)
    except grpc.RpcError as e:
        log.warning("cannot ask containerd at %s which image %s runs: %s", grpc_address, container_id, e.details())
        return None


def image_of_in_child(
    grpc_address: str, namespace: str, container_id: str, timeout: float = 30.0
) -> ImageIdentity | None:
    """image_of() run in a child interpreter, so grpc never loads into the shim; None on any failure."""
    cmd = [sys.executable, "-m", __name__, grpc_address, namespace, container_id]
    try:
        res = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("cannot ask containerd which image %s runs: %s", container_id, e)
        return None
    if res.returncode != 0:
        log.warning(
            "cannot ask containerd which image %s runs: lookup exited %d: %s",
            container_id,
            res.returncode,
            res.stderr.decode(errors="replace").strip()[-500:],
        )
        return None
    return parse_identity(res.stdout)


class ImageLookup:
    """image_of_in_child() started now on a thread, awaited where the identity is first used: a restore
    that compares it with a checkpoint's, or a checkpoint that records it. A Create with nothing to
    restore never waits for it. Quacks like an ImageIdentity (None-ish fields while unknown)."""

    def __init__(self, grpc_address: str, namespace: str, container_id: str) -> None:
        self._value: ImageIdentity | None = None
        self._where = f"{namespace}/{container_id}"
        self._thread = threading.Thread(
            target=self._run, args=(grpc_address, namespace, container_id), name="image-lookup", daemon=True
        )
        self._thread.start()

    def _run(self, grpc_address: str, namespace: str, container_id: str) -> None:
        self._value = image_of_in_child(grpc_address, namespace, container_id)
        if self._value is None:
            log.warning("%s: image identity unknown; a restore cannot be checked against a changed image", self._where)

    def result(self) -> ImageIdentity | None:
        self._thread.join()
        return self._value

    def done(self) -> bool:
        """True once containerd answered (or the lookup failed): result() returns at once."""
        return not self._thread.is_alive()

    def differs_from(self, recorded: dict[str, str] | None) -> str | None:
        value = self.result()
        return value.differs_from(recorded) if value else None

    def as_dict(self) -> dict[str, str] | None:
        value = self.result()
        return value.as_dict() if value else None

    @property
    def base(self) -> str | None:
        value = self.result()
        return value.base if value else None


def parse_identity(data: bytes) -> ImageIdentity | None:
    """The child's answer: a JSON object of three strings, or null."""
    try:
        doc = json.loads(data)
    except ValueError:
        log.warning("image lookup answered something that is not JSON: %r", data[:200])
        return None
    if doc is None:
        return None
    fields = ("name", "digest", "base")
    if not isinstance(doc, dict) or not all(isinstance(doc.get(f), str) for f in fields):
        log.warning("image lookup answered an unexpected document: %r", data[:200])
        return None
    return ImageIdentity(doc["name"], doc["digest"], doc["base"])


def _main(argv: list[str]) -> int:
    if len(argv) != 3:
        sys.stderr.write("usage: python -m shim.protect.image_identity GRPC_ADDRESS NAMESPACE CONTAINER_ID\n")
        return 2
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    identity = image_of(*argv)
    sys.stdout.write(json.dumps(identity.as_dict() if identity else None))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
