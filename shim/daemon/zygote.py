"""The zygote: a shim server, imported once, that forks a fresh shim process for each container.

A fresh shim per container is one failure domain per container, but a Python server that imports
itself before it can answer Create costs hundreds of milliseconds per container on a loaded node. So the
first `start` of a containerd also starts this process (`python -m shim.daemon.zygote PATH ADDRESS PID`),
which imports the server (shim.daemon.server.preload) and waits on a unix socket next to the shims'.
Each later `start` binds its shim socket as before, then hands the zygote that socket, its command line,
environment, working directory and umask; the zygote forks twice and the grandchild becomes the
container's shim: its own session, process and failure domain, orphaned as a shim forked by `start`
is, with `start`'s command line and environment, serving the socket `start` bound. `start` still
prints the address and exits; the shim keeps running, as containerd's shim v2 protocol expects.

The zygote is single-threaded (a fork copies only the calling thread), configures no logging (each
shim sets up its own), holds no descriptor a shim keeps (the shim closes the zygote's), and exits with
the containerd that started it (a pidfd), or when a module it imported changed on disk (an upgrade:
it answers "stale" and exits; `start` then forks the shim itself and starts a new zygote).
REVENANT_SHIM_ZYGOTE=0 in containerd's environment turns it off.

This module is imported by `start`: the client side uses the standard library only.
"""

from __future__ import annotations

import os
import sys

ENABLE_ENV = "REVENANT_SHIM_ZYGOTE"
MAGIC = b"revenant-zygote-1"
REPLY_TIMEOUT = 30.0  # seconds for the forked shim to report its pid (a zygote still importing: longer)
REQUEST_TIMEOUT = 5.0  # seconds the single-threaded zygote waits for a connected `start`'s request
MAX_REQUEST = 1 << 20
CMDLINE_ROOM = 4096  # bytes of empty arguments, so a forked shim can write `start`'s command line there
ENVIRON_ROOM = 16384  # and of environment, for `start`'s environment
ROOM_ENV = "REVENANT_ZYGOTE_ROOM"


class ZygoteUnavailable(Exception):
    """No shim was forked (no zygote, a stale one, a refusal): `start` may fork the shim itself."""


def enabled(address: str) -> bool:
    return bool(address) and os.environ.get(ENABLE_ENV, "1") not in ("0", "false", "no")


def zygote_path(socket_dir: str, address: str) -> str:
    try:
        from _sha256 import sha256  # type: ignore[import-not-found]  # the builtin; hashlib loads OpenSSL
    except ImportError:
        from hashlib import sha256
    return f"{socket_dir}/{sha256(b'revenant-zygote:' + address.encode()).hexdigest()}"


# -- the request ------------------------------------------------------------------------------------
class Request:
    """What a forked shim takes over from `start`."""

    def __init__(
        self, socket_path: str, args: list[str], cmdline: list[str], env: dict[str, str], cwd: str, umask: int
    ) -> None:
        self.socket_path, self.args, self.cmdline = socket_path, args, cmdline  # args: without the program
        self.env, self.cwd, self.umask = env, cwd, umask

    def encode(self) -> bytes:
        """NUL-separated: magic, socket path, cwd, umask, len(args), args..., len(cmdline), cmdline...,
        KEY=VALUE... (none of them can hold a NUL: they come from C strings)."""
        parts = [MAGIC, os.fsencode(self.socket_path), os.fsencode(self.cwd), b"%d" % self.umask]
        for strings in (self.args, self.cmdline):
            parts += [b"%d" % len(strings), *(os.fsencode(a) for a in strings)]
        parts += [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in self.env.items()]
        if any(b"\0" in p for p in parts):
            raise ValueError("a NUL byte in the shim's arguments or environment")
        return b"\0".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> Request:
        """ValueError for anything malformed."""
        parts = data.split(b"\0")
        if len(parts) < 6 or parts[0] != MAGIC:
            raise ValueError("not a zygote request")
        socket_path, cwd, umask = os.fsdecode(parts[1]), os.fsdecode(parts[2]), int(parts[3])
        if not 0 <= umask <= 0o777:
            raise ValueError(f"bad umask {umask:o}")
        if not os.path.isabs(socket_path) or not os.path.isabs(cwd):
            raise ValueError("the socket path and the working directory must be absolute")
        i, lists = 4, []
        for _ in range(2):
            n = int(parts[i]) if i < len(parts) else -1
            if not 0 <= n <= len(parts) - i - 1:
                raise ValueError("bad argument count")
            lists.append([os.fsdecode(a) for a in parts[i + 1 : i + 1 + n]])
            i += 1 + n
        if not lists[1]:
            raise ValueError("empty command line")
        env = {}
        for item in parts[i:]:
            key, eq, value = item.partition(b"=")
            if not eq or not key:
                raise ValueError("bad environment entry")
            env[os.fsdecode(key)] = os.fsdecode(value)
        return cls(socket_path, lists[0], lists[1], env, cwd, umask)


# -- the client: `start` ---------------------------------------------------------------------------
def spawn(path: str, listener_fd: int, socket_path: str, args: list[str]) -> int:
    """Ask the zygote at `path` for a shim serving `listener_fd` (bound at socket_path); its pid.

    ZygoteUnavailable: no shim was forked (safe to fork one here). TimeoutError/OSError after the
    request went out: a shim may have been forked, so `start` must not fork a second one."""
    import struct
    from _socket import AF_UNIX, SCM_RIGHTS, SOCK_SEQPACKET, SOL_SOCKET, socket

    with open("/proc/self/cmdline", "rb") as f:  # interpreter and script, as ps shows this `start`
        cmdline = [os.fsdecode(a) for a in f.read().split(b"\0")[:-1]]
    request = Request(socket_path, args, cmdline, dict(os.environ), os.getcwd(), _umask()).encode()
    sock = socket(AF_UNIX, SOCK_SEQPACKET)
    try:
        try:
            sock.connect(path)
            sock.settimeout(REPLY_TIMEOUT)
            sock.sendmsg([request], [(SOL_SOCKET, SCM_RIGHTS, struct.pack("i", listener_fd))])
        except OSError as e:  # nothing reached a zygote
            raise ZygoteUnavailable(str(e)) from None
        reply = sock.recv(256)  # EOF: every holder of this connection is gone, so no shim lives
        if reply.startswith(b"pid "):
            try:
                return int(reply[4:])
            except ValueError:
                raise OSError(f"the zygote answered {reply!r}") from None
        raise ZygoteUnavailable(reply.decode(errors="replace") or "the zygote closed the connection")
    finally:
        sock.close()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def launch(path: str, address: str) -> None:
    """Start a zygote for the containerd that runs this `start` (our parent), detached from it: a
    double fork, as for a shim. Returns at once; the zygote binds `path` before it imports the
    server, so `start`s meanwhile wait for it (a second zygote finds the path taken and exits)."""
    containerd_pid = os.getppid()  # containerd runs `start`
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.chdir("/")  # not the first container's bundle, which containerd removes with it
        argv = [sys.executable, "-m", "shim.daemon.zygote", path, address, str(containerd_pid)]
        # The zygote's argument and environment areas are where each forked shim writes `start`'s
        # command line and environment: room for them.
        env = {**os.environ, ROOM_ENV: "x" * ENVIRON_ROOM}
        os.execve(sys.executable, argv + [""] * CMDLINE_ROOM, env)
    finally:
        os._exit(1)


# -- the zygote process ----------------------------------------------------------------------------
def _module_stamps() -> dict[str, int]:
    """mtime of each source file of revenant's own modules loaded now."""
    files = (getattr(sys.modules.get(name), "__file__", None) for name in ("shim", "revenant_pb"))
    roots = tuple(os.path.dirname(f) + os.sep for f in files if f)
    if not roots:
        return {}
    stamps = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and path.startswith(roots):
            try:
                stamps[path] = os.stat(path).st_mtime_ns
            except OSError:
                stamps[path] = -1
    return stamps


def _stale(stamps: dict[str, int]) -> bool:
    for path, mtime in stamps.items():
        try:
            if os.stat(path).st_mtime_ns != mtime:
                return True
        except OSError:
            return True
    return False


def _bind(path: str):  # -> socket.socket | None (None: a live zygote has the path)
    import fcntl
    import socket

    dir_fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(path)
            return None
        except OSError:
            pass
        finally:
            probe.close()
        if os.path.lexists(path):
            os.unlink(path)  # a dead zygote's
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(64)
        return sock
    finally:
        os.close(dir_fd)


class Zygote:
    """The zygote's state: its listening socket, the pidfd of its containerd, what it imported."""

    def __init__(self, path: str, listener, containerd_fd: int) -> None:
        self.path, self.listener, self.containerd_fd = path, listener, containerd_fd
        self.inode = os.stat(path).st_ino
        self.stamps = _module_stamps()

    def retire(self) -> None:
        """Let go of the path (a new zygote may bind it at once) and of the listening socket."""
        try:
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        except OSError:
            pass
        self.listener.close()

    def serve(self) -> int:
        import select

        poller = select.poll()
        poller.register(self.listener.fileno(), select.POLLIN)
        poller.register(self.containerd_fd, select.POLLIN)
        try:
            while True:
                ready = {fd for fd, _ in poller.poll()}
                if self.containerd_fd in ready:
                    return 0  # a zygote lives as long as the containerd that started it
                if self.listener.fileno() in ready:
                    try:
                        conn, _ = self.listener.accept()
                    except OSError:
                        continue
                    if not self.handle(conn):
                        return 0
        finally:
            if self.listener.fileno() != -1:
                self.retire()

    def handle(self, conn) -> bool:
        """One request; False when the zygote must exit (its code changed)."""
        import socket
        import struct
        import threading

        fds: list[int] = []
        try:
            conn.settimeout(REQUEST_TIMEOUT)
            cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            uid = struct.unpack("3i", cred)[1]
            msg, ancdata, flags, _ = conn.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(4 * struct.calcsize("i")))
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += struct.unpack(f"{len(data) // 4}i", data[: len(data) - len(data) % 4])
            if uid != os.getuid() or len(fds) != 1 or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                return True  # closing the connection tells `start` that no shim was forked
            request = Request.decode(msg)
            if _stale(self.stamps):
                self.retire()  # before answering: the `start` that hears it launches a new zygote
                conn.send(b"stale: the shim's code changed since this zygote imported it")
                return False
            if threading.active_count() != 1:  # a fork copies one thread; others' locks would stay held
                self.retire()
                conn.send(b"refused: the zygote has threads")
                return False
            child = os.fork()
            if child == 0:
                try:
                    if os.fork() == 0:
                        self.become_shim(conn, fds[0], request)
                finally:
                    os._exit(0)
            os.waitpid(child, 0)
            return True
        except (OSError, ValueError):
            return True
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()

    def become_shim(self, conn, shim_fd: int, request: Request) -> None:
        """In the forked grandchild: turn into the shim `start` asked for. Never returns."""
        import time

        t0 = time.monotonic()
        code = 1
        try:
            self.listener.close()
            os.close(self.containerd_fd)
            os.set_inheritable(shim_fd, False)  # received fds are inheritable; `start`'s was not
            os.setsid()
            os.chdir(request.cwd)
            os.umask(request.umask)
            os.environ.clear()
            os.environ.update(request.env)
            sys.argv = request.cmdline[1:] if len(request.cmdline) > 1 else request.cmdline
            import contextlib

            from shim.libc import set_cmdline, set_environ_area

            # ps and /proc show the container's shim as `start` named it and containerd's environment,
            # not the zygote's (best effort: the room the zygote was started with may not suffice)
            with contextlib.suppress(OSError, ValueError):
                set_cmdline(request.cmdline)
            with contextlib.suppress(OSError, ValueError):
                set_environ_area(request.env)
            import socket

            from shim.daemon.args import parse_args
            from shim.daemon.server import serve

            args = parse_args(request.args)
            if not args.namespace:
                args.namespace = request.env.get("NAMESPACE", "")
            conn.send(b"pid %d" % os.getpid())
            conn.close()
            code = serve(args, socket.socket(fileno=shim_fd), request.socket_path, t0, forked_by="the zygote")
        except BaseException:
            import traceback

            traceback.print_exc()
        os._exit(code)


def main(argv: list[str]) -> int:
    import gc

    path, containerd_pid = argv[0], int(argv[2])
    try:
        containerd_fd = os.pidfd_open(containerd_pid)
    except OSError:
        return 0  # containerd is gone already
    listener = _bind(path)  # first: `start`s that come meanwhile queue here rather than start zygotes
    if listener is None:
        return 0  # another zygote serves this containerd
    from shim.daemon.server import preload

    preload()
    gc.freeze()  # the shims' collections then never touch (and copy) the zygote's objects
    return Zygote(path, listener, containerd_fd).serve()


if __name__ == "__main__":
    sys.exit(main([a for a in sys.argv[1:] if a]))
