"""`revenant rehearse IMAGE -- CMD...`: rehearse spot losses of a job before the real run."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from shim.protect.registry import default_run_dir

from .rehearsal import ContainerdEngine, DockerEngine, Engine, Rehearsal, RehearsalPlan, render


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "rehearse",
        help="run a job under revenant and interrupt it N times: does it resume after a spot loss?",
        description=(
            "Runs IMAGE with revenant's runtime and a checkpoint store, then N times at random moments takes "
            "a final checkpoint, destroys the container and creates it again (as a replacement node would), "
            "and reports whether the job resumed, freeze and restore times, checkpoint sizes and why a "
            "restore failed. Exit status 1 when any did."
        ),
    )
    p.add_argument("image", help="the image (already on this machine: nothing is pulled)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...", help="the job's command (after --)")
    p.add_argument("--engine", choices=("docker", "containerd"), default="docker", help="docker (default) or ctr")
    p.add_argument("--interruptions", "-n", type=int, default=3, metavar="N", help="how many spot losses (3)")
    p.add_argument("--min", dest="min_s", type=float, default=5.0, metavar="S", help="least time between (5)")
    p.add_argument("--max", dest="max_s", type=float, default=20.0, metavar="S", help="most time between (20)")
    p.add_argument("--seed", type=int, default=None, help="seed for the random moments (repeatable rehearsals)")
    p.add_argument("--health-cmd", default=None, metavar="CMD", help="run with sh -c in the container after a restore")
    p.add_argument(
        "--progress-file",
        default=None,
        metavar="PATH",
        help="a file in the container holding a number that must not go back",
    )
    p.add_argument("--store", default=None, metavar="URL", help="checkpoint store (default: a temporary file:// store)")
    p.add_argument("--run-dir", default=None, help="the shims' registry directory (default: the node's)")
    p.add_argument("--docker-host", default=None, metavar="URL", help="dockerd to use (default: DOCKER_HOST)")
    p.add_argument(
        "--network", default="none", help="docker --network for the job (default none; host reaches this machine)"
    )
    p.add_argument(
        "--address", default="/run/containerd/containerd.sock", help="containerd socket (--engine containerd)"
    )
    p.add_argument("--namespace", default="default", help="containerd namespace (--engine containerd)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_rehearse)


def _engine(args: argparse.Namespace) -> Engine:
    if args.engine == "containerd":
        return ContainerdEngine(address=args.address, namespace=args.namespace)
    return DockerEngine(host=args.docker_host, run_args=("--network", args.network))


def cmd_rehearse(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    tmp_store = None
    store = args.store
    if store is None:
        tmp_store = Path(tempfile.mkdtemp(prefix="revenant-rehearse-"))
        store = f"file://{tmp_store}"
    try:
        plan = RehearsalPlan(
            image=args.image,
            command=cmd,
            store=store,
            run_dir=Path(args.run_dir) if args.run_dir else default_run_dir(),
            interruptions=args.interruptions,
            min_s=args.min_s,
            max_s=args.max_s,
            seed=args.seed,
            health_cmd=args.health_cmd,
            progress_file=args.progress_file,
        )
        try:
            rehearsal = Rehearsal(_engine(args), plan, engine_name=args.engine)
        except ValueError as e:
            print(f"revenant rehearse: {e}", file=sys.stderr)
            return 2
        report = rehearsal.run()
    finally:
        if tmp_store is not None:
            shutil.rmtree(tmp_store, ignore_errors=True)
    print(json.dumps(report.to_dict(), indent=2, sort_keys=True) if args.json else render(report))
    return 0 if report.ok else 1
