"""`revenant layer ...`: capture, inspect and apply a container's writable layer by hand."""

from __future__ import annotations

import argparse
import json
import tarfile
from dataclasses import asdict
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("layer", help="capture or apply a container's writable layer (overlay upper dir)")
    sub = p.add_subparsers(dest="layer_command", metavar="ACTION", required=True)

    cap = sub.add_parser("capture", help="write an overlay upper dir's diff as rootfs-diff.tar + .json")
    cap.add_argument("upper", type=Path, help="the overlay upper dir (upperdir= of the rootfs mount)")
    cap.add_argument("out_dir", type=Path)
    cap.set_defaults(func=_capture)

    push = sub.add_parser("push", help="capture an upper dir and put it in a store as a checkpoint of KEY")
    push.add_argument("upper", type=Path)
    push.add_argument("--store", required=True, help="store URL, e.g. file:///var/lib/revenant/store")
    push.add_argument("--key", required=True, help="checkpoint key")
    push.set_defaults(func=_push)

    ls = sub.add_parser("ls", help="list a captured layer tar (whiteouts and opaque markers included)")
    ls.add_argument("tar", type=Path)
    ls.set_defaults(func=_ls)

    apply = sub.add_parser("apply", help="apply a captured layer to an EMPTY directory (checks it is safe)")
    apply.add_argument("tar", type=Path)
    apply.add_argument("upper", type=Path)
    apply.set_defaults(func=_apply)


def _capture(args: argparse.Namespace) -> int:
    from shim.layer import capture_writable_layer

    info = capture_writable_layer(args.upper, args.out_dir)
    print(info.to_json())
    return 0


def _push(args: argparse.Namespace) -> int:
    from shim.layer import checkpoint_writable_layer

    ckpt = checkpoint_writable_layer(args.upper, args.store, args.key)
    print(json.dumps(asdict(ckpt) if hasattr(ckpt, "__dataclass_fields__") else {"result": str(ckpt)}, default=str))
    return 0


def _ls(args: argparse.Namespace) -> int:
    with tarfile.open(args.tar, "r:", encoding="utf-8", errors="surrogateescape") as tf:
        for m in tf:
            link = f" -> {m.linkname}" if m.linkname else ""
            print(f"{m.mode:04o} {m.uid}:{m.gid} {m.size:>12} {m.name}{link}")
    return 0


def _apply(args: argparse.Namespace) -> int:
    from shim.layer import apply_writable_layer

    args.upper.mkdir(parents=True, exist_ok=True)
    print(json.dumps(apply_writable_layer(args.tar, args.upper)))
    return 0
