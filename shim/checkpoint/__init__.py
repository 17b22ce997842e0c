"""Checkpoint and restore of containers through runc + CRIU (see engine.CheckpointEngine)."""

from .engine import CheckpointEngine, CheckpointError, CheckpointResult, DumpHooks, RestoreResult
from .options import CheckpointOptions, RestoreOptions

__all__ = [
    "CheckpointEngine",
    "CheckpointError",
    "CheckpointOptions",
    "CheckpointResult",
    "DumpHooks",
    "RestoreOptions",
    "RestoreResult",
]
