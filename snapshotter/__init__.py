"""revenant's proxy snapshotter (containerd.services.snapshots.v1 over gRPC); the store it reads lives in shim.store."""
