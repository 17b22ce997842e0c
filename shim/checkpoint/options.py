"""What a checkpoint or restore asks of runc/CRIU: containerd.runc.v1.CheckpointOptions as plain data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

CGROUPS_MODES = ("soft", "full", "strict", "ignore")


@dataclass(frozen=True)
class CheckpointOptions:
    exit: bool = False  # stop the task after the dump (else it keeps running)
    open_tcp: bool = False
    external_unix_sockets: bool = False
    terminal: bool = False
    file_locks: bool = False
    empty_namespaces: tuple[str, ...] = ()
    cgroups_mode: str = ""
    work_path: Path | None = None

    def __post_init__(self) -> None:
        if self.cgroups_mode and self.cgroups_mode not in CGROUPS_MODES:
            raise ValueError(f"cgroups_mode {self.cgroups_mode!r} is not one of {', '.join(CGROUPS_MODES)}")

    def criu_flags(self) -> list[str]:
        """Flags runc's checkpoint and restore share, as containerd's runc shim passes them."""
        flags: list[str] = []
        if self.open_tcp:
            flags.append("--tcp-established")
        if self.external_unix_sockets:
            flags.append("--ext-unix-sk")
        if self.terminal:
            flags.append("--shell-job")
        if self.file_locks:
            flags.append("--file-locks")
        if self.cgroups_mode:
            flags += ["--manage-cgroups-mode", self.cgroups_mode]
        return flags


@dataclass(frozen=True)
class RestoreOptions:
    checkpoint: CheckpointOptions = field(default_factory=CheckpointOptions)
    no_pivot: bool = False
