"""Which image a container runs, asked of containerd itself (its gRPC socket, GRPC_ADDRESS).

A checkpoint records the image's content digest; a restore onto a container whose image differs
would run old memory against new binaries, so it starts fresh instead and says why.
"""

from __future__ import annotations

import logging
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
