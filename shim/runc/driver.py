"""A thin driver for the runc CLI: one method per command the shim uses.

Every call passes `--root` (runc's state directory), `--log <file> --log-format json`; a failing
command raises RuncError carrying runc's own error text from that log, not just an exit code.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shim.runc.reaper import CommandResult, run_plain

log = logging.getLogger(__name__)

Runner = Callable[..., CommandResult]


class RuncError(RuntimeError):
    def __init__(self, command: str, argv: Sequence[str], status: int, detail: str) -> None:
        self.command, self.argv, self.status, self.detail = command, list(argv), status, detail
        super().__init__(f"runc {command} failed (exit {status}): {detail or 'no error in the runc log'}")

    @property
    def not_found(self) -> bool:
        return "does not exist" in self.detail or "not exist" in self.detail


@dataclass
class IOFds:
    """The stdio a runc create/exec hands to the container process (fds, or None for /dev/null)."""

    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None


@dataclass
class Runc:
    root: str
    log_path: str
    binary: str = "runc"
    systemd_cgroup: bool = False
    runner: Runner = field(default=run_plain)

    def _argv(self, *args: str) -> list[str]:
        argv = [self.binary, "--root", self.root, "--log", self.log_path, "--log-format", "json"]
        if self.systemd_cgroup:
            argv.append("--systemd-cgroup")
        return [*argv, *args]

    def _log_offset(self) -> int:
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0

    def _errors_since(self, offset: int) -> str:
        """runc's error lines written after `offset` (json log: one object per line)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        messages = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                messages.append(line)
                continue
            if entry.get("level") in ("error", "fatal", "panic"):
                messages.append(entry.get("msg", line))
        return "; ".join(messages)

    def _run(
        self,
        *args: str,
        input: bytes | None = None,
        io: IOFds | None = None,
        timeout: float | None = None,
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> bytes:
        argv = self._argv(*args)
        if wrap is not None:
            argv = wrap(argv)
        offset = self._log_offset()
        kwargs: dict[str, Any] = {}
        if io is not None:
            kwargs = {
                "stdin": io.stdin if io.stdin is not None else subprocess.DEVNULL,
                "stdout": io.stdout if io.stdout is not None else subprocess.DEVNULL,
                "stderr": io.stderr if io.stderr is not None else subprocess.DEVNULL,
            }
        else:
            kwargs["stderr"] = subprocess.DEVNULL  # runc reports errors through --log
        log.debug("exec %s", " ".join(argv))
        res = self.runner(argv, input=input, timeout=timeout, **kwargs)
        if res.status != 0:
            detail = self._errors_since(offset)
            if not detail and res.stdout:
                detail = res.stdout.decode(errors="replace").strip()
            raise RuncError(args[0], argv, res.status, detail)
        return res.stdout

    # -- lifecycle -------------------------------------------------------------------------------
    def create(
        self,
        cid: str,
        bundle: str,
        pid_file: str,
        io: IOFds,
        console_socket: str | None = None,
        no_pivot: bool = False,
        no_new_keyring: bool = False,
    ) -> None:
        args = ["create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        if no_pivot:
            args.append("--no-pivot")
        if no_new_keyring:
            args.append("--no-new-keyring")
        self._run(*args, cid, io=io)

    def start(self, cid: str) -> None:
        self._run("start", cid)

    def exec(self, cid: str, process_json: str, pid_file: str, io: IOFds, console_socket: str | None = None) -> None:
        args = ["exec", "--detach", "--process", process_json, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        self._run(*args, cid, io=io)

    def kill(self, cid: str, signal: int, all_processes: bool = False) -> None:
        args = ["kill"]
        if all_processes:
            args.append("--all")
        self._run(*args, cid, str(signal))

    def delete(self, cid: str, force: bool = False) -> None:
        self._run("delete", *(["--force"] if force else []), cid)

    def pause(self, cid: str) -> None:
        self._run("pause", cid)

    def resume(self, cid: str) -> None:
        self._run("resume", cid)

    def checkpoint(self, cid: str, args: Sequence[str], wrap: Callable[[list[str]], list[str]] | None = None) -> None:
        """`runc checkpoint ARGS cid` (image/work paths and CRIU flags built by the checkpoint engine);
        wrap: the command line that runs runc's instead (e.g. inside a memory cgroup, shim.runc.memcg)."""
        self._run("checkpoint", *args, cid, wrap=wrap)

    def restore(self, cid: str, args: Sequence[str], io: IOFds) -> None:
        """`runc restore ARGS cid`: the restored process gets `io` in place of its dumped stdio."""
        self._run("restore", *args, cid, io=io)

    def update(self, cid: str, resources_json: bytes) -> None:
        self._run("update", "--resources", "-", cid, input=resources_json)

    # -- queries ---------------------------------------------------------------------------------
    def ps(self, cid: str) -> list[int]:
        return json.loads(self._run("ps", "--format", "json", cid) or b"[]") or []

    def stats(self, cid: str) -> dict[str, Any]:
        """`runc events --stats`: one JSON object {"type": "stats", "data": {...}}."""
        return json.loads(self._run("events", "--stats", cid)).get("data", {})
