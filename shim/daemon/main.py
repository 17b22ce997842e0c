"""Entry point of `containerd-shim-revenant-v1`, the binary containerd runs for io.containerd.revenant.v1.

containerd runs it four ways (cwd = the bundle): `start` (create the shim's socket, have the server
forked, by the zygote (shim/daemon/zygote.py) or by `start` itself, print the address), `delete`
(clean up after a dead shim; print a DeleteResponse), `-v`, and (2.x)
`-info` (a RuntimeInfo protobuf on stdout: shim/daemon/info.py).
The `start` path imports as little as possible: containerd waits for it on every container start.
"""

from __future__ import annotations

import os
import sys

from shim.daemon.args import Args, parse_args
from shim.daemon.grouping import SOCKET_DIR, group_of, socket_path


def _ttrpc_reserve(sock, cid: str, timeout: float) -> int:  # sock: a connected socket.socket
    """Call revenant.shim.v1.Shim/Reserve{id} with a hand-built ttrpc frame (importing protobuf and
    the ttrpc client here would cost more than the whole `start` action). Returns the shim's pid when
    it took the container, 0 when it refused."""
    import struct

    def field(number: int, data: bytes) -> bytes:
        return _varint(number << 3 | 2) + _varint(len(data)) + data

    request = field(1, b"revenant.shim.v1.Shim") + field(2, b"Reserve") + field(3, field(1, cid.encode()))
    sock.settimeout(timeout)
    sock.sendall(struct.pack(">IIBB", len(request), 1, 1, 0) + request)  # stream 1, type request

    def recv_exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("shim closed the connection")
            buf += chunk
        return buf

    length, _, msg_type, _ = struct.unpack(">IIBB", recv_exact(10))
    response = recv_exact(length)
    if msg_type != 2 or _status_code(response) != 0:
        return 0
    return max(_reserve_pid(response), 1)


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _nested_varint(message: bytes, outer: int, inner: int) -> int:
    """Varint field `inner` of the first embedded message in field `outer`; 0 when absent."""
    for number, wire, embedded in _fields(message):
        if number == outer and wire == 2:
            for field, field_wire, value in _fields(embedded):
                if field == inner and field_wire == 0:
                    return value
            return 0
    return 0


def _status_code(response: bytes) -> int:
    """ttrpc.Response{status=1 google.rpc.Status{code=1}}: the code, 0 when absent."""
    return _nested_varint(response, 1, 1)


def _bind_or_connect(path: str):  # -> (listener, None) | (None, connected socket to a live shim)
    """Under a lock on the socket directory, so two `start`s never both replace a dead shim's socket."""
    import fcntl
    from _socket import AF_UNIX, SOCK_STREAM, socket  # socket.py would import enum and selectors

    dir_fd = os.open(SOCKET_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        for _ in range(2):
            sock = socket(AF_UNIX, SOCK_STREAM)
            try:
                sock.bind(path)
            except OSError as e:
                sock.close()
                if e.errno != 98:  # EADDRINUSE
                    raise
            else:
                os.chmod(path, 0o600)
                sock.listen(128)
                return sock, None
            probe = socket(AF_UNIX, SOCK_STREAM)
            try:
                probe.connect(path)
                return None, probe
            except OSError:
                probe.close()
                if os.path.exists(path):
                    os.unlink(path)  # left by a dead shim (the directory lock keeps others away)
        raise OSError(f"cannot bind {path}")
    finally:
        os.close(dir_fd)  # releases the lock


def _fields(data: bytes):  # -> Iterator[(field number, wire type, int value | bytes)]
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        if key & 7 == 0:
            value, i = _read_varint(data, i)
            yield key >> 3, 0, value
        elif key & 7 == 2:
            n, i = _read_varint(data, i)
            yield key >> 3, 2, data[i : i + n]
            i += n
        else:
            return


def _reserve_pid(response: bytes) -> int:
    """ttrpc.Response{payload=2 ReserveResponse{pid=1}}."""
    return _nested_varint(response, 2, 1)


def _listen(path: str, cid: str):  # -> (socket.socket | None, shim pid) (None: a live shim took it)
    """Bind the shim socket, or reserve a place in the live shim already serving it. A shim that is
    on its way out refuses the reservation; then wait for it to let go of the path and bind anew."""
    import time

    os.makedirs(SOCKET_DIR, mode=0o700, exist_ok=True)
    deadline = time.monotonic() + 10.0
    while True:
        listener, probe = _bind_or_connect(path)
        if listener is not None:
            return listener, 0
        try:
            pid = _ttrpc_reserve(probe, cid, timeout=max(0.1, deadline - time.monotonic()))
            if pid:
                return None, pid
        except OSError:
            pass  # exiting, or too busy to answer in time
        finally:
            probe.close()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the shim at {path} neither took {cid} nor went away")
        time.sleep(0.02)


def _write_file(name: str, text: str) -> None:
    tmp = name + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, name)


def _publish(path: str, pid: int) -> int:
    """What containerd reads from `start`: shim.pid and address in the bundle, the address on stdout."""
    address = "unix://" + path
    _write_file("shim.pid", str(pid))
    _write_file("address", address)
    sys.stdout.write(address)
    sys.stdout.flush()
    return 0


def _from_zygote(args: Args, listener, path: str) -> int:  # listener: the bound shim socket
    """The pid of a shim the zygote forked to serve `listener`, or 0 when none did (then this `start`
    forks the server itself, and starts a zygote for the next containers if there was none)."""
    from shim.daemon import zygote

    if not zygote.enabled(args.address):
        return 0
    zpath = zygote.zygote_path(SOCKET_DIR, args.address)
    try:
        return zygote.spawn(zpath, listener.fileno(), path, args.argv)
    except zygote.ZygoteUnavailable:
        zygote.launch(zpath, args.address)  # exits at once if a live zygote has the path
        return 0
    except OSError as e:  # the request went out unanswered: a shim may serve the socket, fork none here
        message = f"containerd-shim-revenant-v1: the shim zygote took {args.id} but did not answer: {e}"
        raise SystemExit(message) from None


def action_start(args: Args) -> int:
    path = socket_path(args.address, args.namespace, group_of(args.id))
    listener, shim_pid = _listen(path, args.id)
    if listener is None:
        return _publish(path, shim_pid)
    pid = _from_zygote(args, listener, path)
    if pid:
        listener.close()
        return _publish(path, pid)
    pid = os.fork()
    if pid == 0:  # the shim server; never returns
        import time

        t0 = time.monotonic()
        try:
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 1)  # containerd reads `start`'s stdout until EOF: let go of it now
            os.dup2(null, 2)
            import socket

            from shim.daemon.server import serve

            # start used the bare _socket type; the server wants a full socket.socket
            code = serve(args, socket.socket(fileno=listener.detach()), path, t0)
        except BaseException:
            code = 1
            import traceback

            traceback.print_exc()
        os._exit(code)
    listener.close()
    return _publish(path, pid)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_delete_response(pid: int, exit_status: int, exited_at_ns: int) -> bytes:
    """containerd.task.v2.DeleteResponse{pid=1, exit_status=2, exited_at=3 Timestamp{seconds=1, nanos=2}},
    encoded by hand: importing protobuf would cost the `delete` action more than everything else it does,
    and containerd waits for it when a shim goes away (after every task, not only after crashes)."""
    seconds, nanos = divmod(exited_at_ns, 1_000_000_000)
    ts = (b"\x08" + _varint(seconds) if seconds else b"") + (b"\x10" + _varint(nanos) if nanos else b"")
    out = b""
    if pid:
        out += b"\x08" + _varint(pid)
    if exit_status:
        out += b"\x10" + _varint(exit_status)
    return out + b"\x1a" + _varint(len(ts)) + ts


def _is_mount_point(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ", 5)[4] == path for line in f)


def _warn(args: Args, message: str) -> None:
    # containerd logs the stderr of `delete`; same logrus-style line as the shim's own log.
    sys.stderr.write(f'level=warning msg="{message}" runtime=io.containerd.revenant.v1 id={args.id}\n')


def action_delete(args: Args) -> int:
    """Clean up after a shim that is gone: kill and delete the runc container, unmount the rootfs.
    After a normal task deletion there is nothing left, and the fast path touches neither runc nor
    protobuf."""
    import time

    from shim.task import runtime_options

    bundle = os.path.abspath(args.bundle or os.getcwd())
    opts = runtime_options.RuntimeOptions.load(bundle) or runtime_options.RuntimeOptions(
        root=runtime_options.default_root(bundle, args.namespace)
    )
    if os.path.exists(os.path.join(opts.root, args.id)):  # runc still knows the container
        from shim.runc.driver import Runc, RuncError

        runc = Runc(
            root=opts.root,
            log_path=os.path.join(bundle, "log.json"),
            binary=opts.binary,
            systemd_cgroup=opts.systemd_cgroup,
        )
        try:
            runc.delete(args.id, force=True)
        except RuncError as e:
            if not e.not_found:
                _warn(args, f"cleanup of {args.id}: {e}")
    rootfs = os.path.join(bundle, "rootfs")
    if _is_mount_point(rootfs):
        from shim.task import mounts

        try:
            mounts.unmount_all(rootfs)
        except OSError as e:
            _warn(args, f"unmount rootfs of {args.id}: {e}")
    # The task was killed (SIGKILL), as containerd's runc shim reports it.
    sys.stdout.buffer.write(encode_delete_response(0, 128 + 9, time.time_ns()))
    sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.version:
        from shim.version import __version__  # not at the top: `start` need not open one more file

        print(f"containerd-shim-revenant-v1 (revenant) {__version__}")
        return 0
    if args.info:  # containerd 2.x introspection; protobuf is loaded for this alone
        from shim.daemon import info
        from shim.version import __version__

        return info.main(__version__)
    if not args.namespace:
        args.namespace = os.environ.get("NAMESPACE", "")
    if args.action == "start":
        return action_start(args)
    if args.action == "delete":
        return action_delete(args)
    print("containerd-shim-revenant-v1: expected an action: start or delete", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
