"""`containerd-shim-revenant-v1 -info` as containerd 2.x runs it: the real binary, the runtime options on
stdin, a containerd.types.RuntimeInfo on stdout, decoded here with containerd's proto."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from revenant_pb.containerd.runc.v1 import oci_pb2
from revenant_pb.containerd.types import introspection_pb2
from shim.version import __version__

SHIM = Path(sys.executable).parent / "containerd-shim-revenant-v1"
FEATURES_URL = "types.containerd.io/opencontainers/runtime-spec/1/features/Features"


def run_info(stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(SHIM), "-info"], input=stdin, capture_output=True, timeout=60)


def runc_options(**kw: object) -> bytes:
    wrapped = any_pb2.Any(type_url="containerd.runc.v1.Options", value=oci_pb2.Options(**kw).SerializeToString())
    return wrapped.SerializeToString()


def runc_features() -> dict:
    runc = shutil.which("runc")
    assert runc, "runc is not installed"
    return json.loads(subprocess.run([runc, "features"], capture_output=True, check=True).stdout)


def decode(out: bytes) -> introspection_pb2.RuntimeInfo:
    info = introspection_pb2.RuntimeInfo()
    info.ParseFromString(out)
    return info


def test_info_without_options_carries_runc_features() -> None:
    res = run_info(b"")
    assert res.returncode == 0, res.stderr
    info = decode(res.stdout)
    assert info.name == "io.containerd.revenant.v1"
    assert info.version.version == __version__
    assert not info.HasField("options")
    assert info.features.type_url == FEATURES_URL
    assert json.loads(info.features.value) == runc_features()


def test_info_echoes_runc_options_and_uses_their_binary() -> None:
    stdin = runc_options(binary_name=shutil.which("runc"), root="/run/revenant-test/runc", systemd_cgroup=True)
    res = run_info(stdin)
    assert res.returncode == 0, res.stderr
    info = decode(res.stdout)
    assert info.options.SerializeToString() == any_pb2.Any.FromString(stdin).SerializeToString()
    opts = oci_pb2.Options.FromString(info.options.value)
    assert (opts.root, opts.systemd_cgroup) == ("/run/revenant-test/runc", True)
    assert json.loads(info.features.value) == runc_features()


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        (runc_options(binary_name="/nonexistent/runc"), "not found"),
        (b"\xff\xff\xff\xff", "not a protobuf Any"),
        (any_pb2.Any(type_url="example.com/Other", value=b"x").SerializeToString(), "unsupported runtime options"),
        (b"\x0a" + b"\x80" * 70000, "limit"),
    ],
)
def test_bad_options_are_a_clear_error(stdin: bytes, message: str) -> None:
    res = run_info(stdin)
    assert res.returncode == 1
    assert res.stdout == b""
    assert message in res.stderr.decode(), res.stderr
