"""A process's stdio as containerd describes it: FIFO paths, `binary://` and `file://` log URIs, or a
terminal whose pty master runc sends over a console socket (SCM_RIGHTS).

Without a terminal the container's stdout/stderr are pipes that a shim thread copies into the FIFO
(or log file), as containerd's runc shim does: CRIU can only checkpoint a process whose stdio are pipes
(runc re-wires them at restore from descriptors.json); a host FIFO or file outside the container's
mounts makes every dump fail. The shim keeps a reader on each output FIFO so a client that goes away
does not turn writes into EPIPE. Stdin is copied by a thread from the FIFO into a
pipe: the container must see EOF only once the client has opened its end and closed it (or CloseIO),
never because the client had not opened it yet.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import termios
import threading
from typing import TYPE_CHECKING

from shim.runc.driver import IOFds

if TYPE_CHECKING:
    import urllib.parse

log = logging.getLogger(__name__)

BINARY_READY_TIMEOUT = 10.0


def _open_output_fifo(path: str) -> tuple[int, int]:
    """(write end for the process, reader the shim keeps)."""
    keep = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        w = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except BaseException:
        os.close(keep)
        raise
    return w, keep


class StdinCopier:
    """Copies a stdin FIFO into `dst` until the client closes its end or CloseIO stops it.

    The FIFO is opened non-blocking; Linux reports no hang-up on a FIFO that never had a writer, so
    polling it waits for the client to connect instead of reading a premature EOF.
    """

    def __init__(self, path: str, dst: int, close_dst: bool) -> None:
        self.fifo = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self.dst, self.close_dst = dst, close_dst
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="stdin", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                ready, _, _ = select.select([self.fifo, self._stop_r], [], [])
                if self._stop_r in ready:
                    break
                try:
                    data = os.read(self.fifo, 32768)
                except BlockingIOError:
                    continue
                if not data:
                    break
                view = memoryview(data)
                while view:
                    view = view[os.write(self.dst, view) :]
        except OSError as e:
            log.debug("stdin copy ended: %s", e)
        finally:
            for fd in (self.fifo, self._stop_r, *((self.dst,) if self.close_dst else ())):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def stop(self) -> None:
        """Stop copying and (unless it is a pty) close the process's stdin."""
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        self._thread.join(2.0)
        with contextlib.suppress(OSError):
            os.close(self._stop_w)


class ProcessIO:
    def __init__(self, container_id: str, namespace: str, stdin: str, stdout: str, stderr: str, terminal: bool) -> None:
        self.container_id, self.namespace = container_id, namespace
        self.stdin, self.stdout, self.stderr, self.terminal = stdin, stdout, stderr, terminal
        self._child_fds: list[int] = []  # handed to runc; closed once runc has them
        self._keep: list[int] = []  # held for the process's lifetime
        self._stdin: StdinCopier | None = None
        self.fds = IOFds()
        self.console: int | None = None  # pty master
        self._console_dir: str | None = None
        self._console_listener: socket.socket | None = None
        self._copiers: list[threading.Thread] = []
        self._lock = threading.Lock()

    # -- before runc -----------------------------------------------------------------------------
    def prepare(self) -> str | None:
        """Open everything; returns the console socket path when a terminal is wanted."""
        try:
            if self.terminal:
                return self._listen_console()
            if self.stdin:
                r, w = os.pipe2(os.O_CLOEXEC)
                self._child_fds.append(r)
                self.fds.stdin = r
                self._stdin = StdinCopier(self.stdin, w, close_dst=True)
            self._prepare_outputs()
            return None
        except BaseException:
            self.close()
            raise

    def _prepare_outputs(self) -> None:
        import urllib.parse  # only log URIs need it; the shim's start-up cost matters

        scheme = urllib.parse.urlparse(self.stdout).scheme if self.stdout else ""
        if scheme == "binary":
            self._start_log_binary(urllib.parse.urlparse(self.stdout))
        elif scheme == "file":
            path = urllib.parse.urlparse(self.stdout).path
            os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
            dup = os.dup(fd)
            os.set_inheritable(dup, False)
            self.fds.stdout = self._pipe_into(fd, "stdout")
            self.fds.stderr = self._pipe_into(dup, "stderr")
        else:
            if self.stdout:
                w, keep = _open_output_fifo(self.stdout)
                self._keep.append(keep)
                self.fds.stdout = self._pipe_into(w, "stdout")
            if self.stderr:
                w, keep = _open_output_fifo(self.stderr)
                self._keep.append(keep)
                self.fds.stderr = self._pipe_into(w, "stderr")

    def _pipe_into(self, dst: int, name: str) -> int:
        """A pipe whose write end goes to the process; a thread copies what it writes into dst."""
        r, w = os.pipe2(os.O_CLOEXEC)
        self._child_fds.append(w)
        t = threading.Thread(target=self._copy_out, args=(r, dst, True), name=f"{name}-copy", daemon=True)
        t.start()
        self._copiers.append(t)
        return w

    def _start_log_binary(self, uri: urllib.parse.ParseResult) -> None:
        import urllib.parse

        # The logging-binary protocol: fd 3 stdout, fd 4 stderr, fd 5 closed by the binary when ready.
        args: list[str] = []
        for key, values in urllib.parse.parse_qs(uri.query, keep_blank_values=True).items():
            args.append(key)
            if values and values[0]:
                args.append(values[0])
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        env = {**os.environ, "CONTAINER_ID": self.container_id, "CONTAINER_NAMESPACE": self.namespace}
        # posix_spawn, not Popen(preexec_fn=...): no Python code between fork and exec in a threaded
        # process. Sources are moved above 5 first: dup2(fd, fd) would keep FD_CLOEXEC set.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (out_r, err_r, ready_w)]
        try:
            os.posix_spawn(
                uri.path,
                [uri.path, *args],
                env,
                setsid=True,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_DUP2, high[0], 3),
                    (os.POSIX_SPAWN_DUP2, high[1], 4),
                    (os.POSIX_SPAWN_DUP2, high[2], 5),
                ],
            )
        finally:
            for fd in (out_r, err_r, ready_w, *high):
                os.close(fd)
        try:
            ready, _, _ = select.select([ready_r], [], [], BINARY_READY_TIMEOUT)
            if not ready:
                raise TimeoutError(f"logging binary {uri.path} not ready within {BINARY_READY_TIMEOUT}s")
        finally:
            os.close(ready_r)
        self._child_fds += [out_w, err_w]
        self.fds.stdout, self.fds.stderr = out_w, err_w

    def _listen_console(self) -> str:
        import tempfile

        self._console_dir = tempfile.mkdtemp(prefix="pty", dir="/tmp")
        path = os.path.join(self._console_dir, "pty.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        self._console_listener = listener
        return path

    # -- after runc create/exec ------------------------------------------------------------------
    def after_start(self, timeout: float = 10.0) -> None:
        """runc holds its copies now: drop ours, and for a terminal receive the pty master."""
        for fd in self._child_fds:
            os.close(fd)
        self._child_fds.clear()
        if self.terminal:
            self._receive_console(timeout)
            self._start_console_copy()

    def _receive_console(self, timeout: float) -> None:
        assert self._console_listener is not None
        self._console_listener.settimeout(timeout)
        conn, _ = self._console_listener.accept()
        with conn:
            conn.settimeout(timeout)
            _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
        if not fds:
            raise RuntimeError("runc sent no pty master over the console socket")
        self.console = fds[0]
        os.set_inheritable(self.console, False)
        self._close_console_socket()

    def _close_console_socket(self) -> None:
        if self._console_listener is not None:
            self._console_listener.close()
            self._console_listener = None
        if self._console_dir is not None:
            import shutil

            shutil.rmtree(self._console_dir, ignore_errors=True)
            self._console_dir = None

    def _start_console_copy(self) -> None:
        assert self.console is not None
        if self.stdout:
            w, keep = _open_output_fifo(self.stdout)
            self._keep.append(keep)
            t = threading.Thread(target=self._copy_out, args=(self.console, w), name="pty-out", daemon=True)
            t.start()
            self._copiers.append(t)
        if self.stdin:
            self._stdin = StdinCopier(self.stdin, self.console, close_dst=False)

    @staticmethod
    def _copy_out(src: int, dst: int, close_src: bool = False) -> None:
        """Copy until EOF (every writer closed) or EIO (a pty whose slave ends all closed)."""
        try:
            while True:
                try:
                    data = os.read(src, 65536)
                except OSError as e:
                    if e.errno != errno.EIO:
                        log.warning("stdio read: %s", e)
                    break
                if not data:
                    break
                view = memoryview(data)
                while view:
                    view = view[os.write(dst, view) :]
        except OSError as e:
            log.warning("stdio copy to fd %s stopped: %s", dst, e)
        finally:
            os.close(dst)
            if close_src:
                os.close(src)

    # -- during and after the process's life -----------------------------------------------------
    def resize(self, width: int, height: int) -> None:
        if self.console is None:
            return
        fcntl.ioctl(self.console, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def close_stdin(self) -> None:
        with self._lock:
            copier, self._stdin = self._stdin, None
        if copier is not None:
            copier.stop()

    def wait_output(self, timeout: float = 2.0) -> None:
        """Let a terminal's output reach the client before the exit is reported."""
        for t in self._copiers:
            t.join(timeout)

    def close(self) -> None:
        with self._lock:
            fds = [*self._child_fds, *self._keep]
            self._child_fds, self._keep = [], []
            copier, self._stdin = self._stdin, None
            console, self.console = self.console, None
        if copier is not None:
            copier.stop()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        if console is not None:
            with contextlib.suppress(OSError):
                os.close(console)
        self._close_console_socket()
