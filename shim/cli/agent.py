"""`revenant agent` (the node daemon) and `revenant drain` (the same checkpoint fan-out, by hand)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from typing import Any

from shim.agent.daemon import Agent
from shim.agent.detect import PROVIDERS, make_watcher, parse_metadata_urls
from shim.agent.drain import FAILED, OK, TIMED_OUT, DrainReport, drain
from shim.agent.logfmt import setup_logging
from shim.cli.fmt import human_size
from shim.progress import DEFAULT_LOG_INTERVAL_S, Reporter, enable_log_lines
from shim.protect.registry import default_run_dir, list_tasks

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:9810"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "agent",
        help="watch for spot interruption notices and checkpoint every protected task in time",
        description="Node daemon: polls the cloud metadata service for spot/preemption notices and, on one, "
        "checkpoints every protected task on this node concurrently within the notice's deadline. "
        "Serves Prometheus metrics on /metrics and health on /healthz.",
    )
    p.add_argument(
        "--provider",
        choices=("auto", "none", *PROVIDERS),
        default="auto",
        help="metadata service to watch (default: auto-detect; none: metrics only)",
    )
    p.add_argument(
        "--metadata-url",
        action="append",
        metavar="[PROVIDER=]URL",
        help="metadata base URL, for every provider or one (repeatable), e.g. aws=http://127.0.0.1:8080",
    )
    p.add_argument(
        "--poll-interval",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds between polls (default 5, as AWS suggests; GCP long-polls instead)",
    )
    p.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"address for /metrics and /healthz (default {DEFAULT_LISTEN}; ':PORT' is loopback too; "
        "0.0.0.0:PORT exposes them on every interface; port 0 picks one)",
    )
    p.add_argument(
        "--run-dir", default=None, metavar="DIR", help="node registry root (default $REVENANT_RUN_DIR or /run/revenant)"
    )
    p.add_argument("--log-format", choices=("json", "text"), default="json", help="log line format (default json)")
    _progress_option(p, "during a drain, log progress every S seconds")
    p.set_defaults(func=run_agent)

    d = subparsers.add_parser(
        "drain",
        help="checkpoint every protected task on this node now and stop it (what a spot notice triggers)",
        description="Final checkpoint of every protected task in the node registry, concurrently; each task "
        "is stopped after its dump. Exits non-zero if any task failed.",
    )
    d.add_argument(
        "--run-dir", default=None, metavar="DIR", help="node registry root (default $REVENANT_RUN_DIR or /run/revenant)"
    )
    d.add_argument(
        "--timeout", type=float, default=120.0, metavar="S", help="deadline for all checkpoints together (default 120)"
    )
    d.add_argument("--leave-running", action="store_true", help="checkpoint but keep the tasks running")
    d.add_argument("--json", action="store_true", help="print the report as JSON (and no progress)")
    _progress_option(d, "when stderr is not a terminal, log progress every S seconds")
    d.set_defaults(func=run_drain)


def _progress_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--progress-interval",
        type=float,
        default=DEFAULT_LOG_INTERVAL_S,
        metavar="S",
        help=f"{what} (default {DEFAULT_LOG_INTERVAL_S:g}; 0: none)",
    )


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT; a bare `:PORT` means loopback: exposing the agent is a choice made by naming an
    address (`0.0.0.0:9810`, or the pod IP for a Prometheus scrape)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen {value!r}: expected HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def run_agent(args: argparse.Namespace) -> int:
    setup_logging(args.log_format)
    run_dir = args.run_dir or default_run_dir()
    try:
        urls = parse_metadata_urls(args.metadata_url)
        listen = parse_listen(args.listen)
        watcher = make_watcher(args.provider, urls)
        agent = Agent(
            run_dir, watcher, poll_interval=args.poll_interval, listen=listen, progress_interval=args.progress_interval
        )
    except (ValueError, OSError) as exc:
        log.error("agent: %s", exc)
        return 2

    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        # Only flag it here: logging from a signal handler can deadlock on the handler's lock.
        received.append(signum)
        agent.stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.start()
    try:
        while not agent.stop_event.wait(1.0):
            pass
        if received:
            log.info("agent: %s received, stopping", signal.Signals(received[0]).name)
    finally:
        agent.stop()
    return 0


def format_report(report: DrainReport) -> str:
    headers = ("TASK", "KEY", "RESULT", "SEQ", "UPLOADED", "FROZEN", "TIME", "ERROR")
    rows = [
        (
            r.ref,
            r.key,
            r.status.replace("_", " "),
            "-" if r.seq is None else str(r.seq),
            human_size(r.bytes_uploaded),
            "-" if r.freeze_s is None else f"{r.freeze_s:.2f}s",
            f"{r.duration_s:.2f}s",
            r.error or "",
        )
        for r in report.results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in (headers, *rows)]
    lines.append(
        f"{report.count(OK)} ok, {report.count(FAILED)} failed, {report.count(TIMED_OUT)} timed out "
        f"of {len(report.results)} task(s) in {report.finished - report.started:.1f}s"
    )
    return "\n".join(lines)


def run_drain(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        setup_logging("text", logging.WARNING)
        # The table says per task what went wrong; registry warnings (a bad record) still show.
        logging.getLogger("shim.agent.drain").setLevel(logging.CRITICAL)
    run_dir = args.run_dir or default_run_dir()
    records = [r for r in list_tasks(run_dir) if not r.exited]
    exit_tasks = not args.leave_running
    if not records:
        if args.json:
            print(json.dumps({"ok": True, "tasks": []}))
        else:
            print(f"no protected tasks in {run_dir}")
        return 0
    reporter = None
    if not args.json:  # progress on stderr: stdout stays the table
        mode = "final checkpoint (tasks stop)" if exit_tasks else "leave-running checkpoint"
        print(f"{mode} of {len(records)} protected task(s), deadline {args.timeout:.0f}s ...", file=sys.stderr)
        reporter = Reporter("drain", interval=args.progress_interval, counts_bytes=False, phase="checkpointing")
        if not reporter.tty:
            enable_log_lines()
    report = drain(
        records, exit=exit_tasks, deadline=time.time() + args.timeout, reason="revenant drain", reporter=reporter
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_report(report))
    return 0 if report.ok else 1
