"""revenant's proxy snapshotter and the content-addressed checkpoint store."""
