"""Shim logs in containerd's (logrus) text format, written to the bundle's `log` FIFO, which
containerd reads and copies into its own log. Writes never block the shim: when nobody drains the
FIFO (containerd restarting) and it is full, lines are dropped rather than stalling a task."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os

_LEVELS = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "fatal",
}


def _quote(value: str) -> str:
    if value and all(c.isalnum() or c in "-._/:@" for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogrusFormatter(logging.Formatter):
    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__()
        self.fields = fields

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="microseconds")
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        parts = [
            f'time="{ts.replace("+00:00", "Z")}"',
            f"level={_LEVELS.get(record.levelno, 'info')}",
            f"msg={_quote(msg)}",
        ]
        parts += [f"{k}={_quote(v)}" for k, v in self.fields.items()]
        parts.append(f"logger={record.name}")
        return " ".join(parts)


class FdHandler(logging.Handler):
    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(OSError):  # full FIFO or no reader: drop the line
            os.write(self.fd, (self.format(record) + "\n").encode(errors="replace"))


def open_log_fifo(path: str) -> int | None:
    """O_RDWR: opening never blocks and writing never raises EPIPE when containerd is away."""
    try:
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None


# The storage clients' own loggers log every request, header and signing step at DEBUG: under containerd's
# `-debug` that was ~18 lines per 64 KiB of a put (37k lines for 2 GiB), and their records serialised the upload
# threads on the handler (bench/RESULTS.md, "The in-shim gap at 2 GiB, profiled"). They stay at INFO unless
# REVENANT_DEBUG_STORE_CLIENTS=1 asks for them too.
STORE_CLIENT_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "azure", "google")
DEBUG_STORE_CLIENTS_ENV = "REVENANT_DEBUG_STORE_CLIENTS"


def setup(fd: int, debug: bool, fields: dict[str, str]) -> None:
    logging.raiseExceptions = False
    handler = FdHandler(fd)
    handler.setFormatter(LogrusFormatter(fields))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    clients = logging.DEBUG if debug and os.environ.get(DEBUG_STORE_CLIENTS_ENV) == "1" else logging.INFO
    for name in STORE_CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(clients)


def retarget_stderr(bundle: str) -> None:
    """Point the shim's log (fd 2) at `bundle`'s log FIFO. A shared shim outlives the bundle it started
    in; containerd reads the FIFO of every bundle it starts a task in, so the newest live one is read."""
    fd = open_log_fifo(os.path.join(bundle, "log"))
    if fd is not None:
        os.dup2(fd, 2)
        os.close(fd)
