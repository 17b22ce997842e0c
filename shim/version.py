"""revenant's version: the one place it is written (hatch reads it for the package metadata).

Imported on the shim's start path, so it holds a constant and nothing else."""

__version__ = "0.1.0"
