"""`revenant store put|get|ls|verify|gc|replicate|replicas`: the checkpoint store from the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from shim.progress import DEFAULT_LOG_INTERVAL_S, Reporter, Summary, enable_log_lines
from shim.store import Chunker, open_store
from shim.store.errors import StoreError

from . import store_replicas

DEFAULT_STORE = "file:///var/lib/revenant/store"


def _reporter(args: argparse.Namespace, label: str, first_phase: str) -> Reporter:
    """Progress on stderr: a live line on a terminal, a log line every --progress-interval seconds
    otherwise. stdout carries only the result (text or --json), so it stays parseable."""
    reporter = Reporter(label, interval=args.progress_interval, phase=first_phase)
    if not reporter.tty:
        enable_log_lines()  # the CLI logs warnings only; the periodic progress lines are info
    return reporter


def _finish(args: argparse.Namespace, reporter: Reporter, summary: Summary) -> None:
    """The summary's figures where the progress went: a log line, or (on a terminal, when stdout is
    JSON and so does not say it in words) one stderr line in place of the cleared progress line."""
    reporter.log_summary(summary)
    if reporter.tty and args.json:
        print(summary.text(), file=sys.stderr)


def _emit(args: argparse.Namespace, obj: Any, text: str) -> None:
    print(json.dumps(obj, indent=2, default=str) if args.json else text)


def _open(args: argparse.Namespace):
    opts: dict[str, Any] = {}
    if getattr(args, "chunker", None):
        opts["chunker"] = Chunker.parse(args.chunker)
    if getattr(args, "page_chunker", None):
        opts["page_chunker"] = Chunker.parse(args.page_chunker)
    if args.key_file:
        opts["key_files"] = args.key_file
    if args.allow_plaintext:
        opts["allow_plaintext"] = True
    return open_store(args.store, **opts)


def cmd_put(args: argparse.Namespace) -> int:
    metadata = json.loads(args.metadata) if args.metadata else {}
    reporter = _reporter(args, f"put {args.key}", "scan")
    reporter.bytes_phase("upload", when_full="commit")
    with reporter, _open(args) as store:
        info = store.put(args.key, Path(args.dir), metadata=metadata, progress=reporter, page_images=args.page_images)
    summary = Summary(
        f"put {info.key} seq {info.seq}",
        info.bytes_read,
        reporter.snapshot().elapsed,
        uploaded=info.bytes_uploaded,
        chunks_total=info.chunks_total,
        chunks_new=info.chunks_new,
    )
    _finish(args, reporter, summary)
    _emit(args, info.to_dict(), f"{summary.text()}; {info.files} files, {info.chunks_new} new chunks")
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    reporter = _reporter(args, f"get {args.key}", "manifest")
    reporter.bytes_phase("download", when_full="finish")
    with reporter, _open(args) as store:
        info = store.get(args.key, Path(args.dir), seq=args.seq, fallback=not args.no_fallback, progress=reporter)
    summary = Summary(f"get {info.key} seq {info.seq}", reporter.meter.done, reporter.snapshot().elapsed)
    _finish(args, reporter, summary)
    _emit(args, info.to_dict(), f"{summary.text()}; restored {info.files} files into {args.dir}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    with _open(args) as store:
        infos = store.list(args.key)
    if args.json:
        _emit(args, [i.to_dict() for i in infos], "")
        return 0
    print(f"{'KEY':<40} {'SEQ':>5} {'PARENT':>6} {'CREATED':<20} {'FILES':>6} {'BYTES':>14} {'UPLOADED':>14}")
    for i in infos:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.created))
        print(
            f"{i.key:<40} {i.seq:>5} {i.parent if i.parent is not None else '-':>6} {created:<20} "
            f"{i.files:>6} {i.bytes_read:>14} {i.bytes_uploaded:>14}"
        )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    replicas = store_replicas.resolve(args)
    with _open(args) as store:
        problems = store.verify(args.key)
    if replicas:  # every copy: the primary's problems first, then each replica's, named by URL
        problems = [f"{args.store}: {p}" for p in problems] + store_replicas.verify_replicas(args, _open)
    _emit(
        args,
        {"ok": not problems, "problems": problems},
        "\n".join(problems) if problems else "ok: every checkpoint and chunk verified",
    )
    return 1 if problems else 0


def cmd_gc(args: argparse.Namespace) -> int:
    with _open(args) as store:
        pruned: dict[str, list[int]] = {}
        if args.keep is not None:
            keys = [args.key] if args.key else sorted({i.key for i in store.list()})
            for k in keys:
                pruned[k] = store.prune(k, args.keep)
        stats = store.gc(grace_seconds=args.grace)
    stats["pruned"] = pruned
    _emit(args, stats, " ".join(f"{k}={v}" for k, v in stats.items()))
    return 0


def _wrap(fn):
    def run(args: argparse.Namespace) -> int:
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
        )
        try:
            return fn(args)
        except (StoreError, ValueError, OSError) as e:
            print(f"revenant store {args.store_command}: error: {e}", file=sys.stderr)
            return 1

    return run


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("store", help="the checkpoint store: put, get, ls, verify, gc, replicate, replicas")
    sub = p.add_subparsers(dest="store_command", metavar="STORE_COMMAND", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--store", default=DEFAULT_STORE, help=f"store URL (default {DEFAULT_STORE})")
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.add_argument("-v", "--verbose", action="store_true")
        sp.add_argument(
            "--key-file",
            action="append",
            metavar="PATH",
            help="encrypt with this key file (mode 0600); repeat to add older keys that only read",
        )
        sp.add_argument(
            "--progress-interval",
            type=float,
            default=DEFAULT_LOG_INTERVAL_S,
            metavar="S",
            help="when stderr is not a terminal, log progress every S seconds "
            f"(default {DEFAULT_LOG_INTERVAL_S:g}; 0: only errors and the result)",
        )
        sp.add_argument(
            "--allow-plaintext", action="store_true", help="with --key-file, also read unencrypted checkpoints"
        )

    sp = sub.add_parser("put", help="store DIR as the next checkpoint of KEY")
    common(sp)
    sp.add_argument("--key", required=True)
    sp.add_argument("--metadata", help="JSON object stored with the checkpoint")
    sp.add_argument("--chunker", help="fixed:SIZE or fastcdc:AVG (default: the store's)")
    sp.add_argument("--page-chunker", help="the same for the new pages of --page-images (default fastcdc:262144)")
    sp.add_argument(
        "--page-images",
        action="append",
        default=[],
        metavar="GLOB",
        help="files (relative to DIR) to dedup page by page against the key's newest checkpoint, "
        "e.g. 'criu/pages-*.img' (repeatable)",
    )
    sp.add_argument("dir")
    sp.set_defaults(func=_wrap(cmd_put))

    sp = sub.add_parser("get", help="restore a checkpoint of KEY into DIR (must be empty or absent)")
    common(sp)
    sp.add_argument("--key", required=True)
    sp.add_argument("--seq", type=int, help="sequence number (default: newest usable)")
    sp.add_argument("--no-fallback", action="store_true", help="fail instead of using an older checkpoint")
    sp.add_argument("dir")
    sp.set_defaults(func=_wrap(cmd_get))

    sp = sub.add_parser("ls", help="list checkpoints")
    common(sp)
    sp.add_argument("--key")
    sp.set_defaults(func=_wrap(cmd_ls))

    sp = sub.add_parser("verify", help="check every manifest and chunk (exit 1 on problems)")
    common(sp)
    store_replicas.add_replica_options(sp)
    sp.add_argument("--key")
    sp.set_defaults(func=_wrap(cmd_verify))

    sp = sub.add_parser("gc", help="prune old checkpoints (--keep) and delete unreferenced chunks")
    common(sp)
    sp.add_argument("--key", help="prune only this key")
    sp.add_argument("--keep", type=int, help="keep the newest N checkpoints per key")
    sp.add_argument(
        "--grace", type=float, default=3600.0, help="only delete chunks older than this many seconds (default 3600)"
    )
    sp.set_defaults(func=_wrap(cmd_gc))

    store_replicas.register(sub, common, _wrap, (_open, _reporter))
