"""A workload with more than memory: a file held open since start, a pipe and a unix socketpair between
a parent and its child, a file written into the writable layer. All of it comes back after
`ctr container checkpoint --task --rw` and `ctr containers restore --live --rw`.

`toy` (static C, built here): the parent writes a counter into the pipe, the child reads it and
answers `n+1000` over the socketpair, the parent checks the answer and appends
`n=<n> child=<pid> answer=<a> file=<offset>` to /var/log/toy.log through the descriptor it opened at
start (never reopened: after a restore the lines go on only if that descriptor and its offset came
back). At start it writes /data/made-before.txt; one message stays in flight in the pipe at any time.
"""

from __future__ import annotations

import re
import subprocess

from harness.images import _rootfs_layer, write_oci_archive
from harness.tools import require
from harness.wait import wait_until

from .util import REVENANT, ctr, remove

TOY_C = r"""
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int main(void) {
    int pipefd[2], sv[2];
    mkdir("/data", 0755);
    int made = open("/data/made-before.txt", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (made < 0 || write(made, "written before the checkpoint\n", 30) != 30) return 1;
    close(made);
    int log = open("/var/log/toy.log", O_WRONLY | O_CREAT | O_TRUNC, 0644);  /* held open forever */
    if (log < 0 || pipe(pipefd) || socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) return 1;
    pid_t child = fork();
    if (child == 0) {
        close(pipefd[1]); close(sv[0]);
        long n;
        while (read(pipefd[0], &n, sizeof n) == sizeof n) {
            n += 1000;
            if (write(sv[1], &n, sizeof n) != sizeof n) return 2;
        }
        return 0;
    }
    close(pipefd[0]); close(sv[1]);
    long n = 0, answer;
    if (write(pipefd[1], &n, sizeof n) != sizeof n) return 3;       /* one message always in flight */
    for (;;) {
        if (read(sv[0], &answer, sizeof answer) != sizeof answer) return 4;
        long next = n + 1;
        if (write(pipefd[1], &next, sizeof next) != sizeof next) return 5;
        char line[160];
        int len = snprintf(line, sizeof line, "n=%ld child=%d answer=%ld file=%ld\n", n, (int)child, answer,
                           (long)lseek(log, 0, SEEK_CUR));
        if (write(log, line, len) != len) return 6;
        n = next;
        struct timespec ts = {0, 100 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}
"""

LINE = re.compile(r"^n=(\d+) child=(\d+) answer=(\d+) file=(\d+)$")


def build_toy_image(tmp_path) -> tuple:
    src = tmp_path / "toy.c"
    src.write_text(TOY_C)
    binary = tmp_path / "toy"
    subprocess.run(
        [require("gcc", "gcc libc6-dev"), "-static", "-O2", "-Wall", "-o", str(binary), str(src)], check=True
    )
    layer = _rootfs_layer({"bin/toy": (binary.read_bytes(), 0o755)})
    return write_oci_archive(tmp_path / "toy.tar", "localhost/revenant/toy:test", layer, ["/bin/toy"])


def parse(log_text: str) -> list[tuple[int, int, int, int]]:
    out = []
    for line in log_text.splitlines():
        m = LINE.match(line)
        assert m, f"unexpected line in toy.log: {line!r}"
        out.append(tuple(int(g) for g in m.groups()))
    return out


def test_files_pipe_socketpair_children_and_writable_layer_come_back(node_factory, tmp_path):
    node = node_factory("a")
    image = node.import_image(build_toy_image(tmp_path))
    ctr(node, "run", "-d", "--runtime", REVENANT, image, "ck-toy")
    log = node.rootfs("ck-toy") / "var/log/toy.log"
    wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= 5, 30, "toy running")
    before = ctr(node, "task", "ps", "ck-toy").stdout
    ctr(node, "container", "checkpoint", "--task", "--rw", "ck-toy", "localhost/checkpoint/toy:1")
    lines_at_checkpoint = len(parse(log.read_text()))  # the task runs on; the image holds about this many
    remove(node, "ck-toy")
    ctr(node, "containers", "restore", "--live", "--rw", "ck-toy2", "localhost/checkpoint/toy:1")

    restored_log = node.rootfs("ck-toy2") / "var/log/toy.log"
    wait_until(
        lambda: len(restored_log.read_text().splitlines()) >= lines_at_checkpoint + 10, 60, "the restored toy to go on"
    )
    entries = parse(restored_log.read_text())
    ns = [e[0] for e in entries]
    assert ns == list(range(len(ns))), "the counter restarted or skipped: the processes did not come back"
    children = {e[1] for e in entries}
    assert len(children) == 1, f"the child changed: {children}"  # same pid in the restored pid namespace
    for n, _child, answer, _offset in entries:
        assert answer == n + 1000, (n, answer)  # pipe in, socketpair out, across the restore
    size = 0
    for line, (_, _, _, offset) in zip(restored_log.read_text().splitlines(), entries, strict=True):
        assert offset == size, "the log descriptor's offset did not come back"
        size += len(line) + 1
    assert (node.rootfs("ck-toy2") / "data/made-before.txt").read_text() == "written before the checkpoint\n"
    # parent and child are both there (ctr task ps lists the restored container's processes)
    after = ctr(node, "task", "ps", "ck-toy2").stdout.splitlines()[1:]
    assert len(after) == 2 == len(before.splitlines()[1:]), (before, after)
