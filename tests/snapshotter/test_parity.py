"""Parity: the same scenarios against containerd's built-in `overlayfs` and our `revenant` snapshotter.

Each scenario runs on one containerd node (which has both snapshotters) once per snapshotter and
records a transcript: outcomes of every `ctr` call (success, or the errdefs class of the error),
snapshot listings, mounts with paths normalized, usage figures, what containers print. Two checks:
overlayfs's transcript must be the one the scenario expects, step by step (containerd 1.6's overlayfs
as seen here: so a scenario that fails the same way on both snapshotters, or records nothing, fails),
and revenant's transcript must be identical to it: that is what "behaves like overlayfs" means here.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import field_mask_pb2

from harness.snapshotter_proc import RevenantNode, containerd_snapshots
from revenant_pb.containerd.services.snapshots.v1 import snapshots_pb2 as pb

SNAPSHOTTERS = ("overlayfs", "revenant")
ERROR_CLASSES = ("already exists", "not found", "failed precondition", "invalid argument", "unavailable")


class Transcript:
    def __init__(self, rn: RevenantNode, snapshotter: str) -> None:
        self.rn, self.sn = rn, snapshotter
        self.lines: list[object] = []
        self._ids: dict[str, str] = {}

    # -- normalization ---------------------------------------------------------------------------
    def norm_path(self, text: str) -> str:
        """Snapshot dirs become S1, S2 ... in order of first appearance (ids and roots differ)."""

        def sub(m: re.Match[str]) -> str:
            sid = self._ids.setdefault(m.group(1), f"S{len(self._ids) + 1}")
            return f"{sid}/{m.group(2)}"

        return re.sub(r"/[^\s\",:=]*/snapshots/(\d+)/(fs|work)", sub, text)

    @staticmethod
    def error_class(stderr: str) -> str:
        low = stderr.lower()
        return next((c for c in ERROR_CLASSES if c in low), "error: " + stderr.strip()[-80:])

    # -- recorded operations ---------------------------------------------------------------------
    def ctr(self, *args: str, record: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        res = self.rn.node.ctr(*args, check=False, timeout=timeout)
        if record:
            outcome = "ok" if res.returncode == 0 else self.error_class(res.stderr)
            label = " ".join(re.sub(rf"(^|-){self.sn}$", r"\1<sn>", a) for a in args)
            self.lines.append((label, outcome))
        return res

    def snap(self, *args: str, record: bool = True) -> subprocess.CompletedProcess[str]:
        return self.ctr("snapshots", "--snapshotter", self.sn, *args, record=record)

    def note(self, label: str, value: object) -> None:
        self.lines.append((label, value))

    def listing(self) -> list[tuple[str, str, str]]:
        out = self.snap("ls", record=False).stdout.splitlines()[1:]
        rows = []
        for line in out:
            parts = line.split()
            if len(parts) == 3:
                rows.append((parts[0], parts[1], parts[2]))
            elif len(parts) == 2:
                rows.append((parts[0], "", parts[1]))
        return sorted(rows)

    def mounts(self, key: str) -> list[dict[str, object]]:
        res = self.snap("mounts", "/mnt/unused", key, record=False)
        return [{"cmd": self.norm_path(res.stdout.strip())}] if res.returncode == 0 else []

    def mounts_json(self, res: subprocess.CompletedProcess[str]) -> object:
        return json.loads(self.norm_path(res.stdout)) if res.returncode == 0 and res.stdout.strip() else None

    def usage(self, key: str) -> tuple[int, int] | str:
        res = self.snap("usage", "-b", key, record=False)
        if res.returncode != 0:
            return self.error_class(res.stderr)
        _, size, inodes = res.stdout.splitlines()[1].split()
        return int(size), int(inodes)

    def info(self, key: str) -> dict[str, object] | str:
        res = self.snap("info", key, record=False)
        if res.returncode != 0:
            return self.error_class(res.stderr)
        data = json.loads(res.stdout)
        if "containerd.io/gc.root" in data.get("Labels", {}):
            data["Labels"]["containerd.io/gc.root"] = "<time>"  # ctr stamps the time it ran
        return {k: v for k, v in data.items() if k not in ("Created", "Updated")}


def no_gc_root(labels) -> dict[str, str]:
    """Labels without containerd.io/gc.root, whose value is the time ctr ran."""
    return {k: v for k, v in labels.items() if k != "containerd.io/gc.root"}


def mount_snapshot(t: Transcript, key: str, target: Path) -> None:
    res = t.snap("mounts", str(target), key, record=False)
    assert res.returncode == 0, res.stderr
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(res.stdout.strip(), shell=True, check=True)


def umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], check=True)


# An expected step: (label, value). A label is the exact text or a compiled pattern (for steps naming
# temporary paths); a value is the exact value or a predicate (for figures that depend on the file
# system or on the locally built image: sizes, chain IDs).
Expected = Sequence[tuple[str | re.Pattern[str], Any]]
SN = "snapshots --snapshotter <sn> "


def check_expected(lines: list[object], expected: Expected) -> None:
    """The overlayfs transcript is exactly the expected one: same steps, in order, with the expected results."""
    problems = []
    for i, (line, (label, value)) in enumerate(zip(lines, expected, strict=False)):
        got_label, got = line  # type: ignore[misc]
        label_ok = label.fullmatch(got_label) if isinstance(label, re.Pattern) else label == got_label
        value_ok = value(got) if callable(value) else value == got
        if not (label_ok and value_ok):
            problems.append(f"#{i}: {got_label!r} -> {got!r}\n     expected {label!r} -> {value!r}")
    if len(lines) != len(expected):
        problems.append(f"{len(lines)} steps recorded, {len(expected)} expected")
    full = "\n".join(f"#{i}: {x!r}" for i, x in enumerate(lines))
    assert not problems, (
        "containerd's overlayfs did not do what the scenario expects:\n"
        + "\n".join(problems[:20])
        + "\noverlayfs:\n"
        + full
    )


def run_both(rn: RevenantNode, scenario: Callable[[Transcript], None], expected: Expected) -> None:
    transcripts = {}
    for sn in SNAPSHOTTERS:
        t = Transcript(rn, sn)
        scenario(t)
        transcripts[sn] = t.lines
    a, b = transcripts["overlayfs"], transcripts["revenant"]
    check_expected(a, expected)
    pairs = enumerate(zip(a, b, strict=False))
    diffs = [f"#{i}: overlayfs={x!r}\n     revenant ={y!r}" for i, (x, y) in pairs if x != y]
    full = "\n".join(f"#{i}: {x!r}" for i, x in enumerate(a))
    assert len(a) == len(b) and not diffs, "transcripts differ:\n" + "\n".join(diffs[:20]) + "\noverlayfs:\n" + full


# ------------------------------------------------------------------------------------ scenarios


def test_image_unpack_and_run(revenant_node: RevenantNode, layered_image: Path, layered_ref: str) -> None:
    rn = revenant_node

    def scenario(t: Transcript) -> None:
        t.ctr("images", "import", "--snapshotter", t.sn, str(layered_image), timeout=300)
        rows = t.listing()
        t.note("layers", rows)
        for key, _parent, _kind in rows:
            t.note(f"usage {key}", t.usage(key))
            t.note(f"info {key}", t.info(key))
        script = (
            "cat /data/keep.txt; rm /data/delete-me.txt; mv /data/rename-me.txt /data/renamed.txt;"
            " rm -r /data/replace-dir; mkdir /data/replace-dir; echo n > /data/replace-dir/new;"
            " echo hi > /tmp/x; ls -la /data /data/replace-dir | awk '{print $1, $NF}'; id"
        )
        res = t.ctr(
            "run",
            "--rm",
            "--snapshotter",
            t.sn,
            "--runc-root",
            str(rn.node.runc_root),
            layered_ref,
            f"run-{t.sn}",
            "sh",
            "-c",
            script,
        )
        t.note("container output", res.stdout)
        t.note("after run", t.listing())

    def two_layer_chain(rows: list[tuple[str, str, str]]) -> bool:
        # the image's two layers, committed, the upper one on the lower one (chain IDs sort either way)
        (kinds, parents) = ({r[2] for r in rows}, {r[1] for r in rows})
        names = {r[0] for r in rows}
        return len(rows) == 2 and kinds == {"Committed"} and "" in parents and parents - {""} <= names

    def committed_layer(info: dict) -> bool:
        return info["Kind"] == "Committed" and info["Name"].startswith("sha256:") and "Labels" not in info

    def output(text: str) -> bool:
        data, replaced = text.split("/data/replace-dir: /data/replace-dir:")
        entries = [line.split()[-1] for line in data.splitlines()[3:] if line.strip()]
        return (
            text.startswith("lower layer keeps this\n")  # a file of the lower layer, through the upper one
            and entries == [".", "..", "keep.txt", "renamed.txt", "replace-dir", "sub"]  # delete, rename, whiteout
            and [line.split()[-1] for line in replaced.splitlines()[2:5]] == [".", "..", "new"]  # opaque dir
            and "uid=0(root)" in text
        )

    layer_steps: list[tuple[str | re.Pattern[str], Any]] = []
    for _ in range(2):
        layer_steps += [
            (re.compile(r"usage sha256:[0-9a-f]{64}"), lambda u: u[0] > 0 and u[1] > 0),
            (re.compile(r"info sha256:[0-9a-f]{64}"), committed_layer),
        ]
    run_both(
        rn,
        scenario,
        [
            (re.compile(r"images import --snapshotter <sn> \S+/layered\.tar"), "ok"),
            ("layers", two_layer_chain),
            *layer_steps,
            (
                re.compile(
                    r"run --rm --snapshotter <sn> --runc-root \S+ localhost/revenant/snaptest:layers run-<sn> .*"
                ),
                "ok",
            ),
            ("container output", output),
            ("after run", two_layer_chain),  # --rm: the container's active snapshot is gone
        ],
    )


def test_commit_view_and_removal_semantics(revenant_node: RevenantNode, tmp_path: Path) -> None:
    rn = revenant_node

    def scenario(t: Transcript) -> None:
        mnt = tmp_path / f"mnt-{t.sn}"
        t.note("prepare base-active", t.mounts_json(t.snap("prepare", "--mounts", "base-active")))
        mount_snapshot(t, "base-active", mnt)
        (mnt / "etc").mkdir()
        (mnt / "etc/hello").write_text("hello\n")
        (mnt / "big.bin").write_bytes(b"\1" * 300_000)
        umount(mnt)
        t.note("usage base-active", t.usage("base-active"))
        t.snap("commit", "base", "base-active")
        t.note("usage base", t.usage("base"))
        t.note("info base", t.info("base"))
        t.snap("commit", "again", "base-active")  # gone: NotFound
        t.snap("commit", "base", "base")  # committed is not active
        t.note("prepare act", t.mounts_json(t.snap("prepare", "--mounts", "act", "base")))
        t.note("view v", t.mounts_json(t.snap("view", "--mounts", "v", "base")))
        # ctr gives views no gc.root label: containerd's GC may collect them at any moment otherwise.
        t.snap("label", "v", "containerd.io/gc.root=keep")
        t.snap("prepare", "act", "base")  # AlreadyExists
        t.snap("prepare", "base", "base")  # a committed name is taken too
        t.snap("prepare", "orphan", "no-such-parent")
        t.snap("prepare", "child-of-active", "act")
        t.snap("view", "child-of-view", "v")
        t.snap("commit", "from-view", "v")  # a view cannot be committed
        mount_snapshot(t, "act", mnt)
        (mnt / "etc/hello").unlink()
        (mnt / "layer2.txt").write_text("two\n")
        umount(mnt)
        t.snap("commit", "--help", record=False)
        t.snap("commit", "top", "act")
        t.note("view top2", t.mounts_json(t.snap("view", "--mounts", "top2", "top")))
        t.snap("label", "top2", "containerd.io/gc.root=keep")
        t.note("prepare act2", t.mounts_json(t.snap("prepare", "--mounts", "act2", "top")))
        t.note("mounts act2", t.mounts("act2"))
        t.note("mounts top", t.mounts("top"))  # committed: no mounts
        t.snap("label", "top", "color=blue", "containerd.io/snapshot/x=1")
        t.note("info top labelled", t.info("top"))
        t.snap("label", "top", "color=")
        t.note("info top unlabelled", t.info("top"))
        t.note("listing", t.listing())
        t.snap("rm", "base")  # has children
        t.snap("rm", "top")  # has children
        t.snap("rm", "no-such")
        for key in ("top2", "act2", "v", "top", "base"):
            t.snap("rm", key)
        t.note("listing after rm", t.listing())

    def base_usage(u: tuple[int, int]) -> bool:
        return u[1] == 4 and u[0] >= 300_000  # the root, etc, etc/hello, big.bin; sizes in whole blocks

    overlay_options = ["index=off", "workdir=S2/work", "upperdir=S2/fs", "lowerdir=S1/fs"]
    top = {"Kind": "Committed", "Name": "top", "Parent": "base"}
    run_both(
        rn,
        scenario,
        [
            (SN + "prepare --mounts base-active", "ok"),
            ("prepare base-active", [{"Type": "bind", "Source": "S1/fs", "Options": ["rw", "rbind"]}]),  # no parent
            ("usage base-active", base_usage),
            (SN + "commit base base-active", "ok"),
            ("usage base", base_usage),
            ("info base", {"Kind": "Committed", "Name": "base", "Labels": {"containerd.io/gc.root": "<time>"}}),
            (SN + "commit again base-active", "not found"),  # the active key is gone once committed
            (SN + "commit base base", "already exists"),
            (SN + "prepare --mounts act base", "ok"),
            ("prepare act", [{"Type": "overlay", "Source": "overlay", "Options": overlay_options}]),
            (SN + "view --mounts v base", "ok"),
            ("view v", [{"Type": "bind", "Source": "S1/fs", "Options": ["ro", "rbind"]}]),  # one parent: ro bind
            (SN + "label v containerd.io/gc.root=keep", "ok"),
            (SN + "prepare act base", "already exists"),
            (SN + "prepare base base", "already exists"),  # one key space for active and committed
            (SN + "prepare orphan no-such-parent", "not found"),
            (SN + "prepare child-of-active act", "invalid argument"),  # a parent must be committed
            (SN + "view child-of-view v", "invalid argument"),
            (SN + "commit from-view v", "failed precondition"),
            (SN + "commit top act", "ok"),
            (SN + "view --mounts top2 top", "ok"),
            ("view top2", [{"Type": "overlay", "Source": "overlay", "Options": ["index=off", "lowerdir=S2/fs:S1/fs"]}]),
            (SN + "label top2 containerd.io/gc.root=keep", "ok"),
            (SN + "prepare --mounts act2 top", "ok"),
            (
                "prepare act2",
                [
                    {
                        "Type": "overlay",
                        "Source": "overlay",
                        "Options": ["index=off", "workdir=S3/work", "upperdir=S3/fs", "lowerdir=S2/fs:S1/fs"],
                    }
                ],
            ),
            (
                "mounts act2",
                [
                    {
                        "cmd": "mount -t overlay overlay /mnt/unused"
                        " -o index=off,workdir=S3/work,upperdir=S3/fs,lowerdir=S2/fs:S1/fs"
                    }
                ],
            ),
            ("mounts top", []),  # a committed snapshot has no mounts
            (SN + "label top color=blue containerd.io/snapshot/x=1", "ok"),
            (
                "info top labelled",
                {
                    **top,
                    "Labels": {"color": "blue", "containerd.io/gc.root": "<time>", "containerd.io/snapshot/x": "1"},
                },
            ),
            (SN + "label top color=", "ok"),  # an empty value removes the label
            (
                "info top unlabelled",
                {**top, "Labels": {"containerd.io/gc.root": "<time>", "containerd.io/snapshot/x": "1"}},
            ),
            (
                "listing",
                [
                    ("act2", "top", "Active"),
                    ("base", "", "Committed"),
                    ("top", "base", "Committed"),
                    ("top2", "top", "View"),
                    ("v", "base", "View"),
                ],
            ),
            (SN + "rm base", "failed precondition"),  # it has children
            (SN + "rm top", "failed precondition"),
            (SN + "rm no-such", "not found"),
            (SN + "rm top2", "ok"),
            (SN + "rm act2", "ok"),
            (SN + "rm v", "ok"),
            (SN + "rm top", "ok"),
            (SN + "rm base", "ok"),
            ("listing after rm", []),
        ],
    )


def test_twenty_concurrent_container_prepares(revenant_node: RevenantNode, test_images) -> None:
    rn = revenant_node

    def scenario(t: Transcript) -> None:
        t.ctr("images", "import", "--snapshotter", t.sn, str(test_images.busybox), timeout=300)
        names = [f"c{i:02d}-{t.sn}" for i in range(20)]

        def create(name: str) -> int:
            return rn.node.ctr(
                "containers", "create", "--snapshotter", t.sn, test_images.busybox_ref, name, "sh", check=False
            ).returncode

        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            t.note("creates", sorted(pool.map(create, names)))
        active = [r for r in t.listing() if r[2] == "Active"]
        t.note("active count", len(active))
        t.note("active parents", sorted({r[1] for r in active}))
        res = t.ctr(
            "run",
            "--rm",
            "--snapshotter",
            t.sn,
            "--runc-root",
            str(rn.node.runc_root),
            test_images.busybox_ref,
            f"probe-{t.sn}",
            "sh",
            "-c",
            "echo alive",
        )
        t.note("probe", res.stdout)

        def remove(name: str) -> int:
            return rn.node.ctr("containers", "rm", name, check=False).returncode

        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            t.note("removes", sorted(pool.map(remove, names)))
        t.note("active after", [r for r in t.listing() if r[2] == "Active"])

    run_both(
        rn,
        scenario,
        [
            (re.compile(r"images import --snapshotter <sn> \S+/busybox\.tar"), "ok"),
            ("creates", [0] * 20),
            ("active count", 20),
            ("active parents", lambda ps: len(ps) == 1 and re.fullmatch(r"sha256:[0-9a-f]{64}", ps[0])),  # the image
            (re.compile(r"run --rm --snapshotter <sn> --runc-root \S+ \S+ probe-<sn> sh -c echo alive"), "ok"),
            ("probe", "alive\n"),
            ("removes", [0] * 20),
            ("active after", []),
        ],
    )


def test_list_filters_and_update_through_containerd(revenant_node: RevenantNode) -> None:
    rn = revenant_node

    def scenario(t: Transcript) -> None:
        t.snap("prepare", "f-base-a")
        t.snap("commit", "f-base", "f-base-a")
        t.snap("prepare", "f-act", "f-base")
        t.snap("label", "f-act", "team=red")
        with containerd_snapshots(rn.node.address, rn.node.namespace) as (stub, md):
            # The view is created with its gc.root label in one call: ctr gives views none, and containerd's GC
            # collected f-view between `ctr snapshots view` and the label that was to keep it (seen under load).
            stub.View(
                pb.ViewSnapshotRequest(
                    snapshotter=t.sn, key="f-view", parent="f-base", labels={"containerd.io/gc.root": "keep"}
                ),
                metadata=md,
            )
            t.note("view f-view f-base, kept", "ok")
            for flt in (
                "kind==active",
                "kind==Active",
                "kind==committed",
                "parent==f-base",
                "name==f-view",
                'labels."team"==red',
                "kind==view,parent==f-base",
                "labels.team",
            ):
                resp = stub.List(pb.ListSnapshotsRequest(snapshotter=t.sn, filters=[flt]), metadata=md)
                t.note(f"list {flt}", sorted(i.name for r in resp for i in r.info))
            both = stub.List(
                pb.ListSnapshotsRequest(snapshotter=t.sn, filters=["kind==view", "kind==active"]), metadata=md
            )
            t.note("list OR", sorted(i.name for r in both for i in r.info))
            # keep gc.root: an unreferenced snapshot without it is fair game for containerd's GC
            info = pb.Info(name="f-act", labels={"a": "1", "b": "2", "containerd.io/gc.root": "keep"})
            up = stub.Update(
                pb.UpdateSnapshotRequest(
                    snapshotter=t.sn, info=info, update_mask=field_mask_pb2.FieldMask(paths=["labels.a"])
                ),
                metadata=md,
            )
            t.note("update labels.a", no_gc_root(up.info.labels))
            up = stub.Update(pb.UpdateSnapshotRequest(snapshotter=t.sn, info=info), metadata=md)
            t.note("update all", no_gc_root(up.info.labels))
            st = stub.Stat(pb.StatSnapshotRequest(snapshotter=t.sn, key="f-act"), metadata=md)
            t.note("stat", (st.info.name, st.info.parent, st.info.kind, no_gc_root(st.info.labels)))
        for key in ("f-act", "f-view", "f-base"):
            t.snap("rm", key)

    run_both(
        rn,
        scenario,
        [
            (SN + "prepare f-base-a", "ok"),
            (SN + "commit f-base f-base-a", "ok"),
            (SN + "prepare f-act f-base", "ok"),
            (SN + "label f-act team=red", "ok"),
            ("view f-view f-base, kept", "ok"),
            ("list kind==active", ["f-act"]),
            ("list kind==Active", []),  # kind values are lower case: no match, no error
            ("list kind==committed", ["f-base"]),
            ("list parent==f-base", ["f-act", "f-view"]),
            ("list name==f-view", ["f-view"]),
            ('list labels."team"==red', ["f-act"]),
            ("list kind==view,parent==f-base", ["f-view"]),  # "," is AND
            ("list labels.team", ["f-act"]),  # presence
            ("list OR", ["f-act", "f-view"]),  # several filters are OR
            ("update labels.a", {"a": "1", "team": "red"}),  # a mask touches only its paths
            ("update all", {"a": "1", "b": "2"}),  # no mask: the labels are replaced
            ("stat", ("f-act", "f-base", pb.ACTIVE, {"a": "1", "b": "2"})),
            (SN + "rm f-act", "ok"),
            (SN + "rm f-view", "ok"),
            (SN + "rm f-base", "ok"),
        ],
    )


def test_our_list_filters_agree_with_containerds(revenant_node: RevenantNode) -> None:
    """containerd filters in its metadata layer; ours filter on our own socket. Same answers.

    Only labels under containerd.io/snapshot/ reach a proxy snapshotter, so label filters use those.
    """
    rn = revenant_node
    t = Transcript(rn, "revenant")
    t.snap("prepare", "g-base-a")
    t.snap("commit", "g-base", "g-base-a")
    t.snap("prepare", "g-act", "g-base")
    t.snap("view", "g-view", "g-base")
    for key in ("g-view", "g-base"):
        t.snap("label", key, "containerd.io/gc.root=keep")
    t.snap("label", "g-act", "containerd.io/snapshot/team=red")
    t.snap("label", "g-view", "containerd.io/snapshot/team=blue")
    assert all(outcome == "ok" for _, outcome in t.lines), t.lines
    team = 'labels."containerd.io/snapshot/team"'
    filters = [
        "kind==active",
        "kind==view",
        "kind==committed",
        f"{team}==red",
        f"{team}!=red",
        team,
        f"kind==view,{team}==blue",
        f"{team}~=^b",
    ]
    with containerd_snapshots(rn.node.address, rn.node.namespace) as (stub, md), rn.snapshotter.client() as ours:
        for flt in filters:
            theirs = stub.List(pb.ListSnapshotsRequest(snapshotter="revenant", filters=[flt]), metadata=md)
            mine = ours.List(pb.ListSnapshotsRequest(filters=[flt]))
            names_theirs = sorted(i.name for r in theirs for i in r.info)
            # Our backend keys are containerd's namespaced ones: <namespace>/<n>/<key>.
            names_mine = sorted(i.name.split("/", 2)[2] for r in mine for i in r.info)
            assert names_mine == names_theirs, (flt, names_mine, names_theirs)
            assert names_theirs or flt == f"{team}~=^x", f"{flt} matched nothing: a useless check"
