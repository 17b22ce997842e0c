"""Child subreaper: the shim adopts every orphan below it (container inits after `runc create` exits,
`runc exec --detach` processes) and must reap them all, recording each exit.

Only one place may call wait(): if Popen.wait() and a wait(-1) loop both ran, each would steal the
other's exit statuses. So runc commands are spawned through `Reaper.run` and their status comes back
from the same loop that reaps container processes.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


def exit_status_of(wait_status: int) -> int:
    """The shell convention containerd uses: exit code, or 128 + signal for a killed process."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    if os.WIFEXITED(wait_status):
        return os.WEXITSTATUS(wait_status)
    return 255


@dataclass
class CommandResult:
    argv: Sequence[str]
    status: int
    stdout: bytes


ExitListener = Callable[[int, int], None]  # (pid, exit status) for every exit that is not a command


class Reaper:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._commands: set[int] = set()  # pids of commands a thread is waiting for
        self._command_exits: dict[int, int] = {}
        self._listeners: list[ExitListener] = []
        self._stop = threading.Event()

    def subscribe(self, listener: ExitListener) -> None:
        self._listeners.append(listener)

    # -- the loop (main thread: Python runs signal handlers only there) --------------------------
    def loop(self) -> None:
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.reap()  # children that exited before the handler existed
        while not self._stop.is_set():
            # The timeout is a safety net only; SIGCHLD wakes the loop.
            ready, _, _ = select.select([rfd], [], [], 5.0)
            if ready:
                try:
                    while os.read(rfd, 512):
                        pass
                except BlockingIOError:
                    pass
            self.reap()
        signal.set_wakeup_fd(-1)
        os.close(rfd)
        os.close(wfd)

    def stop(self) -> None:
        self._stop.set()
        os.kill(os.getpid(), signal.SIGCHLD)  # wake select()

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = exit_status_of(status)
            with self._lock:
                if pid in self._commands:
                    self._commands.discard(pid)
                    self._command_exits[pid] = code
                    self._cond.notify_all()
                    continue
            log.debug("reaped pid %d, exit status %d", pid, code)
            for listener in self._listeners:
                try:
                    listener(pid, code)
                except Exception:
                    log.exception("exit listener failed for pid %d", pid)

    # -- commands --------------------------------------------------------------------------------
    def spawn(self, argv: Sequence[str], **popen_kwargs: object) -> subprocess.Popen[bytes]:
        """Start a command whose exit status `wait_command` returns (it is never handed to listeners)."""
        with self._lock:
            proc = subprocess.Popen(argv, **popen_kwargs)  # type: ignore[call-overload]
            self._commands.add(proc.pid)
        return proc

    def wait_command(self, proc: subprocess.Popen[bytes], timeout: float | None = None) -> int:
        with self._lock:
            if not self._cond.wait_for(lambda: proc.pid in self._command_exits, timeout):
                raise TimeoutError(f"{proc.args!r} did not exit within {timeout}s")
            code = self._command_exits.pop(proc.pid)
        proc.returncode = code  # so Popen never calls waitpid itself
        return code

    def run(
        self, argv: Sequence[str], input: bytes | None = None, timeout: float | None = None, **popen_kwargs: object
    ) -> CommandResult:
        """Like subprocess.run with stdout captured unless the caller redirects it."""
        popen_kwargs.setdefault("stdout", subprocess.PIPE)
        popen_kwargs.setdefault("stdin", subprocess.PIPE if input is not None else subprocess.DEVNULL)
        proc = self.spawn(argv, **popen_kwargs)
        out = b""
        try:
            if input is not None and proc.stdin is not None:
                try:
                    proc.stdin.write(input)
                finally:
                    proc.stdin.close()
            if proc.stdout is not None:
                out = proc.stdout.read()
                proc.stdout.close()
        finally:
            status = self.wait_command(proc, timeout)
        return CommandResult(argv, status, out)


def run_plain(
    argv: Sequence[str], input: bytes | None = None, timeout: float | None = None, **popen_kwargs: object
) -> CommandResult:
    """The same contract without a reaper (the `delete` action, tests)."""
    popen_kwargs.setdefault("stdout", subprocess.PIPE)
    popen_kwargs.setdefault("stdin", subprocess.PIPE if input is not None else subprocess.DEVNULL)
    res = subprocess.run(argv, input=input, timeout=timeout, **popen_kwargs)  # type: ignore[call-overload]
    return CommandResult(argv, res.returncode, res.stdout or b"")
