"""Entry point of `revenant-snapshotter`, the proxy snapshotter containerd reaches over gRPC."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="revenant-snapshotter", description="revenant proxy snapshotter")
    p.add_argument("--address", default="/run/revenant/snapshotter.sock", help="unix socket to serve on")
    p.add_argument("--root", default="/var/lib/revenant/snapshotter", help="snapshot state directory")
    return p


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print("revenant-snapshotter: not implemented yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
