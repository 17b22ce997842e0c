"""Hatch build hook: generate the protobuf and gRPC modules (`revenant_pb`) into every wheel.

The generated modules are not in git (`make proto` writes them into proto/ for the editable dev tree),
so a wheel built from a checkout or an sdist runs grpc_tools.protoc itself, into a temporary directory,
and force-includes the result as the top-level `revenant_pb` package (`_pb2.py`, `_pb2.pyi`,
`_pb2_grpc.py` and an `__init__.py` per directory). Editable installs are left alone: they stay a plain
`.pth` over proto/ (no import hook on the shim's start-up path).

Generated code refuses to load on an older runtime than the one it was generated for (protobuf's
ValidateProtobufRuntimeVersion, grpc's GRPC_GENERATED_VERSION), so the build fails when the project's
declared floors for protobuf and grpcio are below what this grpcio-tools generated.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PROTO_ROOT = "proto"
PACKAGE = "revenant_pb"
GENCODE_RE = re.compile(
    r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),"
)
GRPC_GENERATED_RE = re.compile(r"^GRPC_GENERATED_VERSION = '([0-9.]+)'", re.MULTILINE)
FLOOR_RE = re.compile(r"^\s*(protobuf|grpcio)\s*>=\s*([0-9.]+)")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def generate(source_root: Path, out: Path) -> list[Path]:
    """Run protoc (grpc_tools') over every .proto under source_root/PACKAGE into out; returns the files
    written. `python -m grpc_tools.protoc` adds the well-known types' include path itself."""
    protos = sorted(p.relative_to(source_root).as_posix() for p in (source_root / PACKAGE).rglob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files under {source_root / PACKAGE}")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{source_root}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *protos,
        ],
        check=True,
    )
    for directory in [out / PACKAGE, *(d for d in (out / PACKAGE).rglob("*") if d.is_dir())]:
        (directory / "__init__.py").touch()
    return sorted(p for p in (out / PACKAGE).rglob("*") if p.is_file())


def check_floors(generated: list[Path], dependencies: list[str]) -> None:
    """Fail when a declared floor (`protobuf>=X`, `grpcio>=Y`) is older than the generated code needs."""
    needed: dict[str, tuple[int, ...]] = {}
    for path in generated:
        text = path.read_text()
        if m := GENCODE_RE.search(text):
            needed["protobuf"] = max(needed.get("protobuf", ()), tuple(int(g) for g in m.groups()))
        if m := GRPC_GENERATED_RE.search(text):
            needed["grpcio"] = max(needed.get("grpcio", ()), _version_tuple(m.group(1)))
    floors = {m.group(1): _version_tuple(m.group(2)) for d in dependencies if (m := FLOOR_RE.match(d))}
    for name, version in needed.items():
        floor = floors.get(name)
        if floor is None or floor < version:
            want = ".".join(map(str, version))
            raise RuntimeError(
                f"the generated protobuf code needs {name}>={want} at run time, but the project declares "
                f"{name}>={'.'.join(map(str, floor)) if floor else '(none)'}: raise the floor in pyproject.toml "
                "or pin an older grpcio-tools in [build-system] requires"
            )


class CustomBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version == "editable":
            return
        self._tmp = Path(tempfile.mkdtemp(prefix="revenant-pb-"))
        generated = generate(Path(self.root) / PROTO_ROOT, self._tmp)
        check_floors(generated, list(self.metadata.core.dependencies))
        for path in generated:
            build_data["force_include"][str(path)] = path.relative_to(self._tmp).as_posix()

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
