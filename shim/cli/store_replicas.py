"""`revenant store replicate|replicas` and `verify --replica`: checkpoints copied to other stores.

The replicas are `--replica URL` (repeatable) or, with `--node-store NAME`, the primary and replicas
of that store in the node config (REVENANT_CONFIG or /etc/revenant/config.toml).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from shim.progress import Summary
from shim.store import Store
from shim.store.replication import ReplicaStatus, replica_status, replicate


def add_replica_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--replica", action="append", default=[], metavar="URL", help="a replica store (repeat for several)"
    )
    sp.add_argument(
        "--node-store",
        metavar="NAME",
        help="take --store and the replicas from the node config's [stores.NAME] (its key files too)",
    )


def resolve(args: argparse.Namespace) -> list[str]:
    """Fill args.store from --node-store and return the replica URLs."""
    if not args.node_store:
        return list(args.replica)
    from shim.protect.policy import load_node_config

    node = load_node_config()
    if args.node_store not in node.stores:
        raise ValueError(f"the node config has no store named {args.node_store!r} ({', '.join(sorted(node.stores))})")
    args.store = node.stores[args.node_store]
    return [*node.replicas.get(args.node_store, ()), *args.replica]


def _open_all(stack: ExitStack, args: argparse.Namespace, urls: list[str], opener: Callable[..., Store]) -> list[Store]:
    return [stack.enter_context(opener(argparse.Namespace(**{**vars(args), "store": u}))) for u in urls]


def _keys(primary: Store, key: str | None) -> list[str]:
    return [key] if key else sorted({i.key for i in primary.list()})


def cmd_replicate(args: argparse.Namespace, opener: Callable[..., Store], reporter_for: Callable[..., Any]) -> int:
    replicas = resolve(args)
    if not replicas:
        raise ValueError("no replicas: give --replica URL or --node-store NAME")
    results = []
    with ExitStack() as stack:
        primary = stack.enter_context(opener(args))
        stores = _open_all(stack, args, replicas, opener)
        for key in _keys(primary, args.key):
            seqs = sorted(primary._committed(key)) if args.all else [None]
            for dst in stores:
                for seq in seqs:
                    reporter = reporter_for(args, f"replicate {key} to {dst.url}", "list")
                    reporter.bytes_phase("copy", when_full="commit")
                    with reporter:
                        r = replicate(primary, dst, key, seq=seq, progress=reporter, mirror=not args.all)
                    summary = Summary(
                        f"replicate {key} seq {r.seq} to {dst.url}", r.bytes_copied, reporter.snapshot().elapsed
                    )
                    reporter.log_summary(summary)
                    results.append(r)
                    if not args.json:
                        state = "already there" if r.already else f"{r.chunks_copied} chunks copied"
                        print(f"{summary.text()}; {state}, {r.chunks_present} present")
        statuses = [s for key in _keys(primary, args.key) for s in replica_status(primary, stores, key)]
    if args.json:
        _json({"copies": [r.as_dict() for r in results], "status": [s.as_dict() for s in statuses]})
    else:
        _table(statuses)
    return 0


def cmd_replicas(args: argparse.Namespace, opener: Callable[..., Store]) -> int:
    replicas = resolve(args)
    if not replicas:
        raise ValueError("no replicas: give --replica URL or --node-store NAME")
    with ExitStack() as stack:
        primary = stack.enter_context(opener(args))
        stores = _open_all(stack, args, replicas, opener)
        statuses = [s for key in _keys(primary, args.key) for s in replica_status(primary, stores, key)]
    if args.json:
        _json([s.as_dict() for s in statuses])
    else:
        _table(statuses)
    behind = [s for s in statuses if s.error or s.behind]
    return 2 if behind and args.strict else 0


def verify_replicas(args: argparse.Namespace, opener: Callable[..., Store]) -> list[str]:
    """Problems of every replica, each prefixed with the replica's URL (the primary is verified by the caller)."""
    problems = []
    for url in resolve(args):
        with opener(argparse.Namespace(**{**vars(args), "store": url})) as store:
            problems += [f"{url}: {p}" for p in store.verify(args.key)]
    return problems


def _json(obj: Any) -> None:
    import json

    print(json.dumps(obj, indent=2, default=str))


def _table(statuses: list[ReplicaStatus]) -> None:
    print(f"{'KEY':<36} {'REPLICA':<44} {'PRIMARY':>7} {'REPLICA':>7} {'BEHIND':>6} {'LAG_S':>9}")
    for s in statuses:
        where = s.replica if len(s.replica) <= 44 else s.replica[:41] + "..."
        have = "-" if s.replica_seq is None else str(s.replica_seq)
        newest = "-" if s.primary_seq is None else str(s.primary_seq)
        line = f"{s.key:<36} {where:<44} {newest:>7} {have:>7} {s.behind:>6} {s.lag_s:>9.1f}"
        print(line + (f"  error: {s.error}" if s.error else ""))
    if not statuses:
        print("(no checkpoints)", file=sys.stderr)


def register(sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None], wrap, ops) -> None:
    """ops: (opener, reporter_for) from shim.cli.store, so both files open stores the same way."""
    opener, reporter_for = ops
    sp = sub.add_parser("replicate", help="copy checkpoints to replica stores now (progress, summary, lag)")
    common(sp)
    add_replica_options(sp)
    sp.add_argument("--key", help="only this key (default: every key)")
    sp.add_argument("--all", action="store_true", help="every committed checkpoint, not only the newest")
    sp.set_defaults(func=wrap(lambda a: cmd_replicate(a, opener, reporter_for)))

    sp = sub.add_parser("replicas", help="per replica: newest seq against the primary's, and the lag")
    common(sp)
    add_replica_options(sp)
    sp.add_argument("--key", help="only this key (default: every key)")
    sp.add_argument("--strict", action="store_true", help="exit 2 when a replica is behind or does not answer")
    sp.set_defaults(func=wrap(lambda a: cmd_replicas(a, opener)))


__all__ = ["add_replica_options", "register", "resolve", "verify_replicas"]
