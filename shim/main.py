"""Entry point of `containerd-shim-revenant-v1`, the binary containerd runs for io.containerd.revenant.v1."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    # containerd passes Go-style single-dash flags before the action (`-namespace NS ... start`).
    p = argparse.ArgumentParser(
        prog="containerd-shim-revenant-v1",
        description="containerd runtime shim v2 for io.containerd.revenant.v1",
    )
    p.add_argument("-namespace", dest="namespace", default="")
    p.add_argument("-address", dest="address", default="")
    p.add_argument("-publish-binary", dest="publish_binary", default="")
    p.add_argument("-id", dest="id", default="")
    p.add_argument("-bundle", dest="bundle", default="")
    p.add_argument("-socket", dest="socket", default="")
    p.add_argument("-debug", dest="debug", action="store_true")
    p.add_argument("-v", dest="version", action="store_true", help="print the version and exit")
    p.add_argument("action", nargs="?", choices=["start", "delete"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.version:
        print("containerd-shim-revenant-v1 (revenant) 0.1.0")
        return 0
    print("containerd-shim-revenant-v1: not implemented yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
