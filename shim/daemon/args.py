"""The shim binary's command line: Go-style single-dash flags before the action, as containerd passes them
(`-namespace NS -id ID ... start`). Imported by `start` on every container start: standard library only."""

from __future__ import annotations


class Args:
    """Go-style single-dash flags before the action (`-namespace NS -id ID ... start`). A hand parser:
    argparse alone costs a few milliseconds of import on every container start."""

    FLAGS = {
        "-namespace": "namespace",
        "-address": "address",
        "-publish-binary": "publish_binary",
        "-id": "id",
        "-bundle": "bundle",
        "-socket": "socket",
    }
    BOOLS = {"-debug": "debug", "-v": "version", "-version": "version", "-info": "info"}

    def __init__(self) -> None:
        self.namespace = self.address = self.publish_binary = self.id = self.bundle = self.socket = ""
        self.debug = self.version = self.info = False
        self.action = ""
        self.argv: list[str] = []  # as given (without the program)


def parse_args(argv: list[str]) -> Args:
    a = Args()
    a.argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        name = "-" + name.lstrip("-") if name.startswith("-") else name
        if name in Args.FLAGS:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise SystemExit(f"flag needs an argument: {arg}")
                value = argv[i]
            setattr(a, Args.FLAGS[name], value)
        elif name in Args.BOOLS:
            setattr(a, Args.BOOLS[name], value.lower() not in ("false", "0") if eq else True)
        elif name in ("start", "delete") and not a.action:
            a.action = name
        elif name in ("-h", "-help"):
            print(
                "usage: containerd-shim-revenant-v1 [-namespace NS] [-address ADDR] [-publish-binary P]"
                " [-id ID] [-bundle DIR] [-socket S] [-debug] [-v|--version] [-info] [start|delete]"
            )
            raise SystemExit(0)
        else:
            raise SystemExit(f"containerd-shim-revenant-v1: unknown argument {arg!r}")
        i += 1
    return a
