"""`revenant gpu ...`: what the GPU checkpoint support sees on this node."""

from __future__ import annotations

import argparse
import json

from shim.gpu import CudaError, GpuCoordinator, check_compatible


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("gpu", help="GPU checkpoint support on this node")
    sub = p.add_subparsers(dest="gpu_command", metavar="ACTION", required=True)
    info = sub.add_parser("info", help="GPU model, count and driver as checkpoint metadata records them (JSON)")
    info.set_defaults(func=cmd_info)
    state = sub.add_parser("state", help="which of PIDS use CUDA, and their checkpoint state")
    state.add_argument("pids", nargs="+", type=int)
    state.set_defaults(func=cmd_state)
    compat = sub.add_parser("check", help="may a checkpoint with this GPU metadata (JSON file) restore here?")
    compat.add_argument("metadata", type=argparse.FileType("r"))
    compat.set_defaults(func=cmd_check)


def cmd_info(args: argparse.Namespace) -> int:
    print(json.dumps(GpuCoordinator().node_info(), indent=2))
    return 0


def cmd_state(args: argparse.Namespace) -> int:
    coord = GpuCoordinator()
    cuda = {p.pid for p in coord.cuda_processes(args.pids)}
    ok, reason = coord.available()
    for pid in args.pids:
        line = f"{pid}\t{'cuda' if pid in cuda else '-'}"
        if ok:
            try:
                st = coord.driver().get_state(pid)
                line += f"\t{getattr(st, 'name', st)}"
            except CudaError as e:
                line += f"\t{e.name}"
        print(line)
    if not ok:
        print(f"# {reason}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    saved = json.load(args.metadata)
    verdict = check_compatible(saved.get("gpu", saved), GpuCoordinator().node_info())
    print(("compatible: " if verdict.ok else "NOT compatible: ") + verdict.reason)
    return 0 if verdict.ok else 1
