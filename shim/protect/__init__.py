"""Transparent protection of one container: periodic and final checkpoints into the store, and
restore from the newest usable checkpoint when the container is created again on any node."""
