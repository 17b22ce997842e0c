"""The wheel's build hook (hatch_build.py): protoc output for every .proto, and the runtime floors check."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from hatch_build import check_floors, generate

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("pb")
    return out, generate(REPO / "proto", out)


def pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_every_proto_becomes_a_module_stub_and_grpc_module(generated: tuple[Path, list[Path]]) -> None:
    out, files = generated
    names = {p.relative_to(out).as_posix() for p in files}
    protos = sorted((REPO / "proto").rglob("*.proto"))
    assert protos
    for proto in protos:
        stem = proto.relative_to(REPO / "proto").as_posix().removesuffix(".proto")
        assert {f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"} <= names, stem
    for directory in {p.parent for p in files}:
        assert (directory / "__init__.py").exists(), directory


def test_declared_floors_accept_the_generated_code(generated: tuple[Path, list[Path]]) -> None:
    check_floors(generated[1], pyproject()["project"]["dependencies"])


@pytest.mark.parametrize("name", ["protobuf", "grpcio"])
def test_a_floor_below_the_generated_code_fails_the_build(generated: tuple[Path, list[Path]], name: str) -> None:
    deps = [re.sub(rf"^{name}>=.*", f"{name}>=1.0", d) for d in pyproject()["project"]["dependencies"]]
    with pytest.raises(RuntimeError, match=f"needs {name}>="):
        check_floors(generated[1], deps)
    with pytest.raises(RuntimeError, match=f"needs {name}>="):
        check_floors(generated[1], [d for d in deps if not d.startswith(name)])


def test_dev_tree_generates_with_the_build_pin() -> None:
    # `make proto` (dev extra) and the wheel (build requirement) must write the same gencode.
    data = pyproject()
    build_pin = [r for r in data["build-system"]["requires"] if r.startswith("grpcio-tools")]
    dev_pin = [r.split(";")[0].strip() for r in data["project"]["optional-dependencies"]["dev"] if "grpcio-tools" in r]
    assert build_pin and build_pin == dev_pin
