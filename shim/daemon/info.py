"""`containerd-shim-revenant-v1 -info`: the shim's RuntimeInfo for containerd 2.x introspection.

containerd 2.x runs a shim binary with `-info`, the task's runtime options (a protobuf `Any`, possibly
empty) on stdin, and decodes stdout as containerd.types.RuntimeInfo. Its CRI plugin reads the OCI
runtime features from it (`features`: runc's `runc features` JSON document in an `Any` whose type URL
is the one containerd registers for the runtime-spec features type), as it does for its own runc shim.
Imported only for `-info`, so `start` and `delete` never load protobuf.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from revenant_pb.containerd.runc.v1 import oci_pb2
from revenant_pb.containerd.types import introspection_pb2

log = logging.getLogger(__name__)

RUNTIME_NAME = "io.containerd.revenant.v1"
FEATURES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
RUNC_OPTIONS_TYPE_URLS = ("containerd.runc.v1.Options", "type.googleapis.com/containerd.runc.v1.Options")
MAX_OPTIONS_BYTES = 64 * 1024  # runc Options are a few hundred bytes; stdin is not trusted to be small
MAX_FEATURES_BYTES = 1024 * 1024
FEATURES_TIMEOUT_S = 10.0


class InfoError(Exception):
    """The request on stdin or the runtime binary's answer cannot be used."""


def read_options(data: bytes) -> tuple[any_pb2.Any | None, oci_pb2.Options | None]:
    """The request's options `Any` and, when it holds runc Options, those decoded."""
    if not data:
        return None, None
    if len(data) > MAX_OPTIONS_BYTES:
        raise InfoError(f"runtime options on stdin are {len(data)} bytes (limit {MAX_OPTIONS_BYTES})")
    wrapped = any_pb2.Any()
    try:
        wrapped.ParseFromString(data)
    except DecodeError as e:
        raise InfoError(f"runtime options on stdin are not a protobuf Any: {e}") from e
    if not wrapped.type_url:
        return None, None
    if wrapped.type_url not in RUNC_OPTIONS_TYPE_URLS:
        raise InfoError(f"unsupported runtime options type {wrapped.type_url!r} (want containerd.runc.v1.Options)")
    opts = oci_pb2.Options()
    try:
        opts.ParseFromString(wrapped.value)
    except DecodeError as e:
        raise InfoError(f"runtime options are not containerd.runc.v1.Options: {e}") from e
    return wrapped, opts


def runc_features(binary: str) -> bytes | None:
    """`runc features` as JSON bytes, checked to be a JSON object; None when the binary has no such
    command (then RuntimeInfo carries no features, as containerd's runc shim does)."""
    path = shutil.which(binary)
    if path is None:
        raise InfoError(f"runtime binary {binary!r} not found on PATH")
    try:
        res = subprocess.run([path, "features"], capture_output=True, timeout=FEATURES_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.debug("runc features failed: %s", e)
        return None
    if res.returncode != 0 or len(res.stdout) > MAX_FEATURES_BYTES:
        log.debug("runc features: exit %d, %d bytes", res.returncode, len(res.stdout))
        return None
    try:
        doc = json.loads(res.stdout)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    return json.dumps(doc, separators=(",", ":")).encode()


def runtime_info(stdin: bytes, version: str) -> introspection_pb2.RuntimeInfo:
    wrapped, opts = read_options(stdin)
    info = introspection_pb2.RuntimeInfo(name=RUNTIME_NAME)
    info.version.version = version
    if wrapped is not None:
        info.options.CopyFrom(wrapped)
    features = runc_features((opts.binary_name if opts else "") or "runc")
    if features is not None:
        info.features.type_url = FEATURES_TYPE_URL
        info.features.value = features
    return info


def main(version: str) -> int:
    try:
        info = runtime_info(sys.stdin.buffer.read(MAX_OPTIONS_BYTES + 1), version)
    except InfoError as e:
        sys.stderr.write(f"containerd-shim-revenant-v1 -info: {e}\n")
        return 1
    out = info.SerializeToString()
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    return 0
