"""The `revenant` command line: one sub-command module per area, each with `register(subparsers)`.

Only the module of the command being run is imported (the agent, store and protection modules pull in
boto3, protobuf and grpc); the others appear in the parser by name and help alone, so `revenant --help`
still lists every command. `tests/unit/test_entry_points.py` checks this table against the modules."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from shim.version import __version__

# command -> (the module whose register() adds it, its one-line help as that module writes it)
COMMANDS: dict[str, tuple[str, str]] = {
    "agent": (
        "shim.cli.agent",
        "watch for spot interruption notices and checkpoint every protected task in time",
    ),
    "drain": (
        "shim.cli.agent",
        "checkpoint every protected task on this node now and stop it (what a spot notice triggers)",
    ),
    "gpu": ("shim.cli.gpu", "GPU checkpoint support on this node"),
    "ls": ("shim.cli.protect", "protected containers on this node (key, store, last checkpoint)"),
    "checkpoint": ("shim.cli.protect", "checkpoint a protected container now"),
    "history": ("shim.cli.protect", "the checkpoints of a key in a store"),
    "stats": ("shim.cli.stats", "statistics of a container's last checkpoint (from its shim)"),
    "layer": ("shim.cli.layer", "capture or apply a container's writable layer (overlay upper dir)"),
    "store": ("shim.cli.store", "the checkpoint store: put, get, ls, verify, gc, replicate, replicas"),
    "rehearse": (
        "shim.cli.rehearse",
        "run a job under revenant and interrupt it N times: does it resume after a spot loss?",
    ),
}


def command_of(argv: Sequence[str]) -> str | None:
    """The sub-command argv names: its first word that is not an option (the top-level parser has only
    flags that take no value, so nothing else can stand before it)."""
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("-"):
            return arg
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for running `command`: that command's module registers its real sub-parsers; every
    other command is a bare entry with its help, enough for `--help` and for argparse's "invalid
    choice" message. command=None (or an unknown name) imports no sub-command module at all."""
    p = argparse.ArgumentParser(prog="revenant", description="checkpoint and restore containers across nodes")
    p.add_argument("--version", action="version", version=f"revenant {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    module = COMMANDS[command][0] if command in COMMANDS else None
    if module is not None:
        importlib.import_module(module).register(sub)
    registered = set(sub.choices)
    for name, (owner, help_text) in COMMANDS.items():
        if owner != module and name not in registered:
            sub.add_parser(name, help=help_text, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(command_of(argv))
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return int(func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
