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


def image_of(grpc_address: str, namespace: str, container_id: str, timeout: float = 10.0) -> ImageIdentity | None:
    """The container's image name and digest, or None when containerd cannot say (logged)."""
    import grpc

    from revenant_pb.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
    from revenant_pb.containerd.services.images.v1 import images_pb2, images_pb2_grpc

    target = grpc_address if grpc_address.startswith("unix:") else f"unix://{grpc_address}"
    metadata = ((GRPC_NAMESPACE_KEY, namespace),)
    try:
        with grpc.insecure_channel(target) as channel:
            container = containers_pb2_grpc.ContainersStub(channel).Get(
                containers_pb2.GetContainerRequest(id=container_id), metadata=metadata, timeout=timeout
            ).container
            if not container.image:
                return ImageIdentity("", "")
            try:
                image = images_pb2_grpc.ImagesStub(channel).Get(
                    images_pb2.GetImageRequest(name=container.image), metadata=metadata, timeout=timeout
                ).image
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    return ImageIdentity(container.image, "")
                raise
            return ImageIdentity(container.image, image.target.digest)
    except grpc.RpcError as e:
        log.warning("cannot ask containerd at %s which image %s runs: %s", grpc_address, container_id, e.details())
        return None
