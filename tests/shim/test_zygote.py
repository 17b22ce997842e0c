"""The zygote (shim.daemon.zygote): a pre-imported server that forks a fresh shim per container. Each
container must still get its own shim process and failure domain, started as `start` would start it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.containerd import ContainerdNode
from harness.wait import wait_until
from shim.daemon import zygote

from .conftest import REVENANT_SHIM
from .helpers import task_status
from .test_shared_shim import revenant_shims


# -- the request and the command line, without containerd -------------------------------------------
def test_request_round_trip_and_refusals():
    r = zygote.Request("/run/s/x", ["-id", "c", "start"], ["/py", "/bin/shim", "-id", "c"], {"A": "1=2"}, "/b", 0o22)
    back = zygote.Request.decode(r.encode())
    assert (back.socket_path, back.args, back.cmdline, back.env, back.cwd, back.umask) == (
        "/run/s/x",
        ["-id", "c", "start"],
        ["/py", "/bin/shim", "-id", "c"],
        {"A": "1=2"},
        "/b",
        0o22,
    )
    good = r.encode()
    for bad in (
        good.replace(zygote.MAGIC, b"something-else"),
        good.replace(b"/run/s/x", b"run/s/x"),  # relative socket path
        good.replace(b"\0/b\0", b"\0b\0"),  # relative working directory
        good.replace(b"\0" + b"%d" % 0o22 + b"\0", b"\0" + b"4096" + b"\0"),  # umask out of range
        good.replace(b"\x003\x00-id", b"\x0099\x00-id"),  # more arguments than the request holds
        good + b"\0NOEQUALS",  # an environment entry without '='
        zygote.MAGIC,
    ):
        with pytest.raises(ValueError):
            zygote.Request.decode(bad)
    with pytest.raises(ValueError):
        zygote.Request("/s", ["a\0b"], ["/py"], {}, "/", 0).encode()


def test_stale_when_an_imported_file_changed(tmp_path: Path):
    f = tmp_path / "m.py"
    f.write_text("x = 1\n")
    stamps = {str(f): f.stat().st_mtime_ns}
    assert not zygote._stale(stamps)
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1_000_000))
    assert zygote._stale(stamps)
    f.unlink()
    assert zygote._stale(stamps)


def test_set_cmdline_rewrites_what_ps_shows():
    code = textwrap.dedent(
        """
        import sys
        from shim.libc import set_cmdline
        set_cmdline(["/usr/bin/containerd-shim-revenant-v1", "-id", "c1", "start"])
        print(open("/proc/self/cmdline", "rb").read().rstrip(b"\\0").decode("ascii", "replace"))
        print(open("/proc/self/comm").read().strip())
        try:
            set_cmdline(["x" * 100000])
        except ValueError as e:
            print("refused:", e)
        """
    )
    res = subprocess.run([sys.executable, "-c", code, "padding" * 10], capture_output=True, text=True, check=True)
    cmdline, comm, refused = res.stdout.splitlines()
    assert cmdline.split("\0") == ["/usr/bin/containerd-shim-revenant-v1", "-id", "c1", "start"]
    assert comm == "containerd-shim"  # the kernel keeps 15 bytes
    assert refused.startswith("refused: command line of 100001 bytes does not fit")


# -- with containerd --------------------------------------------------------------------------------
def zygotes(node: ContainerdNode) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"shim.daemon.zygote" in argv[:3] and node.address.encode() in argv:
            found.append(int(pid))
    return found


def forked_by(node: ContainerdNode, pid: int) -> str:
    """Who forked shim `pid`, from its "serving on" line in containerd's log ("start" or "the zygote")."""
    text = node.log_path.read_text(errors="replace")
    found = re.findall(rf"shim {pid} serving on \S+ \(\d+ ms after fork by ([^)]+)\)", text)
    return found[-1] if found else ""


def run_sleeper(node: ContainerdNode, cid: str) -> int:
    node.ctr("run", "-d", "--runtime", REVENANT_SHIM, node.image, cid, "sleep", "1000", input="")  # type: ignore[attr-defined]
    pid = int((node.bundle(cid) / "shim.pid").read_text())
    wait_until(lambda: forked_by(node, pid), 30, f"shim of {cid} logs that it serves")
    return pid


@pytest.fixture
def node(test_images):
    node = ContainerdNode("zygote")
    try:
        node.start()
        node.image = node.import_image(test_images.busybox)  # type: ignore[attr-defined]
        yield node
    finally:
        node.destroy()


def test_each_container_gets_its_own_shim_forked_by_the_zygote(node: ContainerdNode):
    first = run_sleeper(node, "first")
    assert forked_by(node, first) == "start"  # no zygote yet: `start` forked it and launched one
    wait_until(lambda: zygotes(node), 30, "a zygote for this containerd")
    shims = {cid: run_sleeper(node, cid) for cid in ("second", "third")}
    [zygote_pid] = zygotes(node)
    for cid, pid in shims.items():
        assert forked_by(node, pid) == "the zygote"
        status = Path(f"/proc/{pid}/status").read_text()
        assert re.search(r"^PPid:\s+(\d+)$", status, re.M).group(1) != str(zygote_pid)  # type: ignore[union-attr]
        assert os.getsid(pid) == pid  # its own session, as a shim forked by `start`
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        assert argv[-3:] == [b"-id", cid.encode(), b"start"] or argv[-4:-1] == [b"-id", cid.encode(), b"-debug"]
        assert any(a.endswith(b"containerd-shim-revenant-v1") for a in argv[:2])
        assert os.readlink(f"/proc/{pid}/cwd") == str(node.bundle(cid))
        env = dict(e.split(b"=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in e)
        assert env[b"TTRPC_ADDRESS"].startswith(str(node.dir).encode())  # containerd's, for this shim
        assert zygote.ROOM_ENV.encode() not in env  # containerd's environment, not the zygote's
    assert set(revenant_shims(node)) == {first, *shims.values()}  # the zygote is none of them
    res = node.ctr("task", "exec", "--exec-id", "e", "third", "echo", "from-third", input="")
    assert res.stdout.strip() == "from-third"


def test_a_forked_shim_is_its_own_failure_domain(node: ContainerdNode):
    run_sleeper(node, "warm")  # launches the zygote
    wait_until(lambda: zygotes(node), 30, "a zygote")
    victim, survivor = run_sleeper(node, "victim"), run_sleeper(node, "survivor")
    assert forked_by(node, victim) == forked_by(node, survivor) == "the zygote"
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: task_status(node, "victim") in ("STOPPED", "ABSENT"), 60, "victim's task cleaned up")
    assert task_status(node, "survivor") == "RUNNING"
    res = node.ctr("task", "exec", "--exec-id", "e", "survivor", "echo", "alive", input="")
    assert res.stdout.strip() == "alive"

    # The zygote itself dying takes no shim with it; the next `start` forks its shim and a new zygote.
    [old] = zygotes(node)
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: not os.path.exists(f"/proc/{old}"), 30, "old zygote gone")
    assert task_status(node, "survivor") == "RUNNING"
    after = run_sleeper(node, "after")
    assert forked_by(node, after) == "start"
    wait_until(lambda: zygotes(node), 30, "a new zygote")
    assert forked_by(node, run_sleeper(node, "again")) == "the zygote"


def test_the_zygote_exits_with_its_containerd(test_images):
    node = ContainerdNode("zygote-exit")
    try:
        node.start()
        image = node.import_image(test_images.busybox)
        node.ctr("run", "--rm", "--runtime", REVENANT_SHIM, image, "one", "true", input="")
        wait_until(lambda: zygotes(node), 30, "a zygote")
        [pid] = zygotes(node)
    finally:
        node.destroy()
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}"), "the zygote outlived its containerd"
