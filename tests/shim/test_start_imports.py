"""A fresh shim per container pays every import before it can answer Create; these tests pin down
what the start path loads, so a top-level import of the store, CRIU, GPU or gRPC code (in the shim's
wiring or in a module it imports) shows up here rather than as a slower container start.

Not a timing test: each asserts which modules are loaded, in a fresh interpreter or in a live shim."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from harness.containerd import ContainerdNode

from .conftest import REVENANT_SHIM
from .test_shared_shim import revenant_shims

REPO = Path(__file__).resolve().parents[2]

# Loaded only for a protected container, a checkpoint or Control's checkpoint (shim.daemon.deferred).
DEFERRED = (
    "shim.store",
    "shim.layer",
    "shim.checkpoint",
    "shim.gpu",
    "shim.protect.manager",
    "shim.protect.checkpointer",
    "shim.protect.restorer",
    "shim.task.checkpoint_backend",
    "zstandard",
    "blake3",
    "cryptography",
    "grpc",
    "boto3",
    "urllib3",
)
# Never loaded by `start` itself (containerd waits for it on every container start).
NOT_IN_START = (*DEFERRED, "google.protobuf", "revenant_pb", "shim.ttrpc", "shim.task", "shim.protect")

# Native modules of the deferred set, as a live shim's memory map names their shared objects.
DEFERRED_LIBRARIES = ("zstandard", "blake3", "cryptography", "cygrpc", "libssl", "libcrypto")


def run_python(code: str, tmp_path: Path) -> dict:
    """Run `code` in a fresh interpreter (cwd tmp_path); it prints one JSON object as its last line."""
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def loaded(modules: list[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


def test_start_action_imports_no_server_code(tmp_path: Path):
    out = run_python(
        """
        import json, sys
        from shim.daemon import main
        main.parse_args(["-namespace", "ns", "-address", "/run/x.sock", "-id", "c", "start"])
        print(json.dumps({"modules": sorted(sys.modules)}))
        """,
        tmp_path,
    )
    assert loaded(out["modules"], NOT_IN_START) == []


def test_shim_wiring_defers_protection_until_a_container_is_protected(tmp_path: Path):
    """The shim as built for its first request, then an unprotected container's Create hook: none of
    the deferred modules load. Then a protected container's: the manager and the store load (so this
    test sees a module that loads)."""
    unprotected, protected = tmp_path / "plain", tmp_path / "protected"
    for bundle, given in ((unprotected, {}), (protected, {"revenant.io/checkpoint-key": "ns/job"})):
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps({"annotations": given}))
    (tmp_path / "config.toml").write_text(f'store = "file://{tmp_path / "store"}"\n')
    out = run_python(
        f"""
        import json, os, socket, sys
        from types import SimpleNamespace

        os.environ["REVENANT_CONFIG"] = {str(tmp_path / "config.toml")!r}
        from shim.daemon.main import parse_args
        from shim.daemon.server import build

        path = {str(tmp_path / "shim.sock")!r}
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        shim = build(parse_args(["-namespace", "ns", "-id", "c", "start"]), path)
        after_build = sorted(sys.modules)
        plan = shim.protection.before_create(SimpleNamespace(id="c", namespace="ns", bundle={str(unprotected)!r}), "")
        after_plain = sorted(sys.modules)
        shim.protection.started(SimpleNamespace(id="c"))
        shim.protection.exited("c", 0, 0.0)
        shim.protection.deleted(SimpleNamespace(id="c"))
        after_lifecycle = sorted(sys.modules)
        protects = shim.protection._protects({str(protected)!r})
        manager = type(shim.protection.manager).__module__
        print(json.dumps({{
            "after_build": after_build, "after_plain": after_plain, "after_lifecycle": after_lifecycle,
            "plan": repr(plan), "protects": protects, "manager": manager, "after_manager": sorted(sys.modules),
        }}))
        """,
        tmp_path,
    )
    assert loaded(out["after_build"], DEFERRED) == []
    assert "shim.task.service" in out["after_build"]  # the wiring did happen
    assert loaded(out["after_plain"], DEFERRED) == [] and out["plan"] == "None"
    assert loaded(out["after_lifecycle"], DEFERRED) == []
    assert out["protects"] is True
    assert out["manager"] == "shim.protect.manager"
    assert {"shim.store", "zstandard", "shim.checkpoint"} <= set(out["after_manager"])


def test_live_shim_of_an_unprotected_container_maps_no_deferred_library(containerd_node: ContainerdNode, test_images):
    """A real shim after Create and Start of an unprotected container (one shim per container, the
    default): none of the deferred native libraries is mapped into it; protobuf's is (the check works)."""
    image = containerd_node.import_image(test_images.busybox)
    containerd_node.ctr("run", "-d", "--runtime", REVENANT_SHIM, image, "lean", "sleep", "1000", input="")
    try:
        pid = int((containerd_node.bundle("lean") / "shim.pid").read_text())
        assert pid in revenant_shims(containerd_node)
        maps = Path(f"/proc/{pid}/maps").read_text()
        libraries = {line.split()[-1] for line in maps.splitlines() if line.endswith(".so") or ".so." in line}
        assert any("google/_upb" in lib or "protobuf" in lib for lib in libraries), libraries
        assert [lib for lib in libraries if any(name in lib for name in DEFERRED_LIBRARIES)] == []
    finally:
        containerd_node.ctr("task", "kill", "-s", "SIGKILL", "lean", check=False)
        containerd_node.ctr("task", "rm", "-f", "lean", check=False)
        containerd_node.ctr("container", "rm", "lean", check=False)


def test_zygote_preload_covers_what_a_shim_imports_to_serve(tmp_path: Path):
    """A shim forked by the zygote imports nothing more to build itself (else every container pays it
    again), and the zygote preloads none of the deferred modules (else every shim maps them)."""
    out = run_python(
        f"""
        import json, socket, sys
        from shim.daemon.server import preload, build
        from shim.daemon.main import parse_args
        preload()
        before = set(sys.modules)
        path = {str(tmp_path / "shim.sock")!r}
        socket.socket(socket.AF_UNIX).bind(path)
        build(parse_args(["-namespace", "ns", "-id", "c", "start"]), path)
        print(json.dumps({{"preloaded": sorted(before), "new": sorted(set(sys.modules) - before)}}))
        """,
        tmp_path,
    )
    assert out["new"] == []
    assert loaded(out["preloaded"], DEFERRED) == []
    assert "shim.task.service" in out["preloaded"]
