"""The `revenant` command line: one sub-command module per area, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute sub-commands; each defines register(subparsers) and sets `func` on its parsers.
SUBCOMMAND_MODULES: list[str] = [
    "shim.cli.agent",
    "shim.cli.gpu",
    "shim.cli.protect",
    "shim.cli.stats",
    "shim.cli.layer",
    "shim.cli.store",
    "shim.cli.rehearse",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="revenant", description="checkpoint and restore containers across nodes")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return int(func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
