"""Entry point of `revenant-snapshotter`, the proxy snapshotter containerd reaches over gRPC."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from shim.version import __version__

log = logging.getLogger("revenant.snapshotter")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="revenant-snapshotter", description="revenant proxy snapshotter")
    p.add_argument("--version", action="version", version=f"revenant-snapshotter {__version__}")
    p.add_argument("--address", default="/run/revenant/snapshotter.sock", help="unix socket to serve on")
    p.add_argument("--root", default="/var/lib/revenant/snapshotter", help="snapshot state directory")
    p.add_argument(
        "--store",
        default=os.environ.get("REVENANT_STORE") or None,
        help="checkpoint store URL for restores whose labels name none (default: $REVENANT_STORE)",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Imported late so `--help` works even before `make proto`.
    from snapshotter.overlay import OverlaySnapshotter
    from snapshotter.service import serve

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    snap = OverlaySnapshotter(root, store_url=args.store)
    server = serve(snap, args.address)

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    # Let in-flight requests finish (each is one transaction) for a few seconds, then close the DB.
    server.stop(grace=10).wait()
    snap.close()
    Path(args.address).unlink(missing_ok=True)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
