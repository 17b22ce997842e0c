"""The long-lived shim process: subreaper, ttrpc server with the Task service, event publisher."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

from shim import shimlog

log = logging.getLogger(__name__)


def serve(args, listener, socket_path: str, t0: float | None = None) -> int:  # args: shim.main.Args
    fd = shimlog.open_log_fifo("log")
    if fd is not None:
        os.dup2(fd, 2)  # tracebacks of a crash reach containerd's log too
        os.close(fd)
    shimlog.setup(2, args.debug, {"runtime": "io.containerd.revenant.v1", "namespace": args.namespace})

    from shim.events import Publisher
    from shim.reaper import Reaper, set_child_subreaper
    from shim.task_service import TaskService
    from shim.ttrpc import Server

    set_child_subreaper()
    reaper = Reaper()
    publisher = Publisher(os.environ.get("TTRPC_ADDRESS", ""), args.namespace)
    server = Server()
    service = TaskService(args.namespace, publisher, reaper, on_shutdown=server.shutdown)
    server.register(service.service())

    def serve_then_stop() -> None:
        try:
            server.serve(listener)
        except Exception:
            log.exception("ttrpc server failed")
        finally:
            reaper.stop()

    threading.Thread(target=serve_then_stop, name="ttrpc-accept", daemon=True).start()
    started = f" ({(time.monotonic() - t0) * 1e3:.0f} ms after fork)" if t0 is not None else ""
    log.info("shim %d serving on %s%s", os.getpid(), socket_path, started)
    reaper.loop()  # main thread: SIGCHLD handling runs here
    publisher.close()
    with contextlib.suppress(OSError):
        os.unlink(socket_path)
    log.info("shim %d exiting", os.getpid())
    return 0
