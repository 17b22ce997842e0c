"""`revenant stats CONTAINER`: the last checkpoint's statistics (CRIU times, pages, image bytes), asked
of the container's shim over revenant.v1.Control/Stats."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

TASK_DIR = "io.containerd.runtime.v2.task"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("stats", help="statistics of a container's last checkpoint (from its shim)")
    p.add_argument("container")
    p.add_argument("--namespace", "-n", default=os.environ.get("CONTAINERD_NAMESPACE", "default"))
    p.add_argument(
        "--state",
        default="/run/containerd",
        help=f"containerd's state directory (the shim's address is in <state>/{TASK_DIR}/<ns>/<id>)",
    )
    p.add_argument("--address", help="the shim's ttrpc address (unix:///...), instead of looking it up")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.set_defaults(func=cmd_stats)


def shim_address(state: Path, namespace: str, container: str) -> str:
    path = state / TASK_DIR / namespace / container / "address"
    try:
        return path.read_text().strip()
    except OSError as e:
        raise SystemExit(
            f"revenant stats: no shim address for {namespace}/{container} ({e}); give --state or --address"
        ) from None


def fetch_stats(address: str, namespace: str, container: str) -> dict:
    from revenant_pb.revenant.v1 import control_pb2
    from shim.ttrpc import NAMESPACE_KEY, Client, ServiceClient

    with Client(address, timeout=30) as client:
        control = ServiceClient(client, control_pb2.DESCRIPTOR.services_by_name["Control"], {NAMESPACE_KEY: namespace})
        resp = control.Stats(control_pb2.StatsRequest(id=container))
    return json.loads(resp.stats_json)


def format_stats(stats: dict) -> str:
    criu = stats.get("criu") or {}
    lines = [
        f"container        {stats.get('container_id')}",
        f"total            {stats.get('duration_s', 0):.3f} s",
        f"image bytes      {stats.get('image_bytes', 0)}",
    ]
    for key, label in (
        ("freezing_time_us", "freezing time"),
        ("frozen_time_us", "frozen time"),
        ("memdump_time_us", "memory dump"),
        ("memwrite_time_us", "memory write"),
    ):
        if key in criu:
            lines.append(f"{label:<16} {criu[key]} us")
    for key, label in (("pages_scanned", "pages scanned"), ("pages_written", "pages written")):
        if key in criu:
            lines.append(f"{label:<16} {criu[key]}")
    if "revenant" in stats:
        r = stats["revenant"]
        lines.append(f"store            {r.get('key')}@{r.get('seq')} uploaded {r.get('bytes_uploaded')} bytes")
    return "\n".join(lines)


def cmd_stats(args: argparse.Namespace) -> int:
    from shim.ttrpc import TtrpcError

    address = args.address or shim_address(Path(args.state), args.namespace, args.container)
    try:
        stats = fetch_stats(address, args.namespace, args.container)
    except (TtrpcError, OSError) as e:
        print(f"revenant stats: {e}", file=sys.stderr)
        return 1
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0
