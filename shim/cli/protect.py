"""`revenant ls`, `revenant checkpoint` and `revenant history`: protected containers seen by a user.

`ls` reads the node registry (docs/control.md); `checkpoint` asks the container's shim over
revenant.v1.Control (the address in its registry record); `history` lists a key's checkpoints in a store.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from shim.agent.drain import OK, checkpoint_task
from shim.cli.fmt import human_size
from shim.progress import DEFAULT_LOG_INTERVAL_S, Reporter, enable_log_lines
from shim.protect.registry import TaskRecord, default_run_dir, list_tasks


def register(subparsers: Any) -> None:
    ls = subparsers.add_parser(
        "ls",
        help="protected containers on this node (key, store, last checkpoint)",
        description="Protected containers on this node, from the node registry.",
    )
    ls.add_argument(
        "--run-dir", default=None, metavar="DIR", help="node registry root (default $REVENANT_RUN_DIR or /run/revenant)"
    )
    ls.add_argument("--json", action="store_true", help="print the registry records as JSON")
    ls.set_defaults(func=cmd_ls)

    ck = subparsers.add_parser(
        "checkpoint",
        help="checkpoint a protected container now",
        description="Take a checkpoint of a protected container into its store now, "
        "through its shim. The container keeps running unless --exit.",
    )
    ck.add_argument("container", help="container id")
    ck.add_argument("--namespace", "-n", default=None, help="containerd namespace (needed if the id is ambiguous)")
    ck.add_argument(
        "--exit",
        action="store_true",
        help="final checkpoint: stop the container once it is committed (it runs on if that fails)",
    )
    ck.add_argument("--timeout", type=float, default=600.0, metavar="S", help="give up after S seconds (600)")
    ck.add_argument(
        "--run-dir", default=None, metavar="DIR", help="node registry root (default $REVENANT_RUN_DIR or /run/revenant)"
    )
    ck.add_argument("--json", action="store_true", help="print the result as JSON (and no progress)")
    ck.add_argument(
        "--progress-interval",
        type=float,
        default=DEFAULT_LOG_INTERVAL_S,
        metavar="S",
        help="when stderr is not a terminal, log progress every S seconds "
        f"(default {DEFAULT_LOG_INTERVAL_S:g}; 0: none)",
    )
    ck.set_defaults(func=cmd_checkpoint)

    hi = subparsers.add_parser(
        "history",
        help="the checkpoints of a key in a store",
        description="Committed checkpoints of KEY in the store, oldest first.",
    )
    hi.add_argument("key", help="checkpoint key (revenant.io/checkpoint-key)")
    hi.add_argument("--store", required=True, metavar="URL", help="store URL (file://, s3://, az://, gs://, oci://)")
    hi.add_argument("--json", action="store_true", help="print the checkpoints as JSON")
    hi.set_defaults(func=cmd_history)


def age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h ago"
    return f"{seconds / 86400:.0f}d ago"


def interval(seconds: float) -> str:
    if seconds <= 0:
        return "off"
    if seconds % 3600 == 0:
        return f"{seconds / 3600:.0f}h"
    if seconds % 60 == 0:
        return f"{seconds / 60:.0f}m"
    return f"{seconds:g}s"


def table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in (headers, *rows)
    )


def _run_dir(args: argparse.Namespace) -> Path:
    return Path(args.run_dir) if args.run_dir else default_run_dir()


def cmd_ls(args: argparse.Namespace) -> int:
    records = list_tasks(_run_dir(args))
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=2, sort_keys=True))
        return 0
    if not records:
        print(f"no protected containers in {_run_dir(args)}")
        return 0
    now = time.time()
    rows = []
    for r in records:
        last = r.last_checkpoint
        rows.append(
            (
                r.ref,
                r.key,
                r.store,
                f"#{last.seq} {age(now - last.time)}" if last else "never",
                human_size(last.bytes_uploaded) if last else "-",
                interval(r.interval_s),
                (r.last_error or "")[:80],
            )
        )
    print(table(("CONTAINER", "KEY", "STORE", "LAST CHECKPOINT", "UPLOADED", "INTERVAL", "LAST ERROR"), rows))
    return 0


def find_record(records: list[TaskRecord], container: str, namespace: str | None) -> TaskRecord:
    matches = [r for r in records if r.id == container and (namespace is None or r.namespace == namespace)]
    if not matches:
        where = f" in namespace {namespace}" if namespace else ""
        raise LookupError(
            f"{container}{where} is not a protected container on this node "
            "(no registry record; `revenant ls` lists them)"
        )
    if len(matches) > 1:
        raise LookupError(
            f"{container} exists in namespaces {', '.join(r.namespace for r in matches)}: pick one with --namespace"
        )
    return matches[0]


def cmd_checkpoint(args: argparse.Namespace) -> int:
    try:
        record = find_record(list_tasks(_run_dir(args)), args.container, args.namespace)
    except LookupError as e:
        print(f"revenant checkpoint: {e}", file=sys.stderr)
        return 1
    kind = "final checkpoint (the container stops)" if args.exit else "checkpoint"
    label = f"{kind} of {record.ref} (key {record.key}) into {record.store}"
    # The shim answers once, at the end, and reports no bytes on the way: show phase and elapsed
    # time only (a live line on a terminal, a log line every --progress-interval seconds otherwise).
    reporter = Reporter("checkpoint", interval=args.progress_interval, counts_bytes=False, phase="shim checkpointing")
    if not args.json:
        print(label, file=sys.stderr)
        if not reporter.tty:
            enable_log_lines()
        reporter.start()
    try:
        result = checkpoint_task(
            record, exit=args.exit, deadline=time.time() + args.timeout, reason="revenant checkpoint"
        )
    finally:
        reporter.close()
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    elif result.status == OK:
        print(
            f"{record.ref}: committed {record.key} seq {result.seq}: {human_size(result.bytes_read)} read, "
            f"{human_size(result.bytes_uploaded)} uploaded, frozen {result.freeze_s or 0:.3f}s, "
            f"total {result.total_s or 0:.2f}s"
        )
    else:
        print(f"{record.ref}: checkpoint {result.status.replace('_', ' ')}: {result.error}", file=sys.stderr)
    return 0 if result.status == OK else 1


def history_row(info: Any) -> dict[str, Any]:
    md = info.metadata or {}
    return {
        "key": info.key,
        "seq": info.seq,
        "parent": info.parent,
        "created": info.created,
        "reason": md.get("reason"),
        "exit": md.get("exit"),
        "node": md.get("node"),
        "image": (md.get("image") or {}).get("name"),
        "freeze_s": md.get("freeze_s"),
        "files": info.files,
        "bytes_read": info.bytes_read,
        "bytes_uploaded": info.bytes_uploaded,
        "chunks_total": info.chunks_total,
        "chunks_new": info.chunks_new,
    }


def cmd_history(args: argparse.Namespace) -> int:
    from shim.store import StoreError, open_store

    try:
        store = open_store(args.store)
        try:
            infos = store.list(args.key)
        finally:
            store.close()
    except (StoreError, ValueError, OSError) as e:
        print(f"revenant history: {e}", file=sys.stderr)
        return 1
    rows = [history_row(i) for i in infos]
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    if not rows:
        print(f"no checkpoints of {args.key} in {args.store}")
        return 0
    now = time.time()
    print(
        table(
            ("SEQ", "CREATED", "REASON", "NODE", "SIZE", "UPLOADED", "CHUNKS NEW", "FROZEN"),
            [
                (
                    str(r["seq"]),
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"])) + f" ({age(now - r['created'])})",
                    str(r["reason"] or "-"),
                    str(r["node"] or "-"),
                    human_size(r["bytes_read"]),
                    human_size(r["bytes_uploaded"]),
                    f"{r['chunks_new']}/{r['chunks_total']}",
                    "-" if r["freeze_s"] is None else f"{r['freeze_s']:.3f}s",
                )
                for r in rows
            ],
        )
    )
    return 0
