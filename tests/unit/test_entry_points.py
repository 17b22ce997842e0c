"""The commands' entry points: one version everywhere, `--version`/`-v`, and what each start-up imports.

Imports are checked in a fresh interpreter (this one has long since imported everything)."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys

import pytest

from shim.cli import COMMANDS, build_parser, command_of
from shim.version import __version__

HEAVY = ("google.protobuf", "grpc", "boto3", "argparse")
CLI_MODULES = sorted({module for module, _ in COMMANDS.values()})


def imported_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running code."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    return set(json.loads(out.stdout.splitlines()[-1]))


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60)


def test_version_is_a_release_number() -> None:
    parts = __version__.split(".")
    assert len(parts) == 3 and all(p.isdigit() for p in parts), __version__


@pytest.mark.parametrize("module", CLI_MODULES)
def test_command_table_matches_what_each_module_registers(module: str) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    importlib.import_module(module).register(sub)
    registered = {action.dest: action.help for action in sub._choices_actions}
    listed = {name: help_text for name, (owner, help_text) in COMMANDS.items() if owner == module}
    assert registered == listed


def test_command_of_finds_the_first_word() -> None:
    assert command_of(["store", "ls", "--store", "file:///x"]) == "store"
    assert command_of(["--version"]) is None
    assert command_of(["-h", "drain", "--json"]) == "drain"
    assert command_of(["--", "store"]) is None
    assert command_of([]) is None


def test_help_lists_every_command_without_importing_them() -> None:
    modules = imported_after("from shim.cli import build_parser; build_parser(None).format_help()")
    assert not modules & set(CLI_MODULES)
    assert not [m for m in modules if m.startswith(HEAVY[:3])]
    help_text = build_parser(None).format_help()
    for name, (_, help_text_of) in COMMANDS.items():
        assert f"    {name} " in help_text or f"    {name}\n" in help_text, name
        assert help_text_of.split()[0] in help_text


def test_a_command_imports_only_its_own_module() -> None:
    modules = imported_after("from shim.cli import build_parser; build_parser('store')")
    assert modules & set(CLI_MODULES) == {"shim.cli.store"}


def test_running_a_command_parses_its_real_arguments() -> None:
    args = build_parser("store").parse_args(["store", "ls", "--store", "file:///nowhere", "--key", "k"])
    assert (args.command, args.store_command, args.store, args.key) == ("store", "ls", "file:///nowhere", "k")
    assert callable(args.func)


def test_unknown_command_is_refused_with_the_list() -> None:
    out = run("-c", "import sys; from shim.cli import main; sys.exit(main(['nosuch']))")
    assert out.returncode == 2
    assert "invalid choice: 'nosuch'" in out.stderr and "'store'" in out.stderr


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("from shim.cli import main; main(['--version'])", f"revenant {__version__}"),
        ("from snapshotter.main import main; main(['--version'])", f"revenant-snapshotter {__version__}"),
        ("from shim.daemon.main import main; main(['-v'])", f"containerd-shim-revenant-v1 (revenant) {__version__}"),
        (
            "from shim.daemon.main import main; main(['--version'])",
            f"containerd-shim-revenant-v1 (revenant) {__version__}",
        ),
    ],
)
def test_each_command_answers_its_version(code: str, expected: str) -> None:
    out = run("-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


def test_connect_reports_the_same_version() -> None:
    from shim.task import service

    assert f"revenant-shim {__version__}" == service.VERSION


def test_shim_start_path_stays_light() -> None:
    # containerd runs `containerd-shim-revenant-v1 start` on every container start.
    modules = imported_after("import shim.daemon.main")
    assert not [m for m in modules if m.startswith(HEAVY)]
    assert not [m for m in modules if m.startswith("revenant_pb")]
