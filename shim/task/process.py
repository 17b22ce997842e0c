"""One object per process (a task's init and each exec) with an explicit state machine.

    created --start--> running --pause--> paused --resume--> running
    created|running|paused --(exit)--> stopped --delete--> deleted
    created --delete--> deleted            (a task that was never started)

An RPC that the current state does not allow raises FailedPrecondition (NotFound for signalling a
process that is gone) instead of surfacing whatever runc would say.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field

from google.protobuf import timestamp_pb2

from shim.errors import FailedPrecondition, NotFound
from shim.task.stdio import ProcessIO


class State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    DELETED = "deleted"


S = State
# action -> states it is legal in
ALLOWED: dict[str, frozenset[State]] = {
    "start": frozenset({S.CREATED}),
    "pause": frozenset({S.RUNNING}),
    "resume": frozenset({S.PAUSED}),
    "kill": frozenset({S.CREATED, S.RUNNING, S.PAUSED}),
    "delete": frozenset({S.CREATED, S.STOPPED}),
    "exec": frozenset({S.RUNNING}),
    "update": frozenset({S.CREATED, S.RUNNING, S.PAUSED}),
    "stats": frozenset({S.CREATED, S.RUNNING, S.PAUSED}),
    "pids": frozenset({S.CREATED, S.RUNNING, S.PAUSED}),
    "checkpoint": frozenset({S.RUNNING, S.PAUSED}),
}
# action -> state it leads to
NEXT: dict[str, State] = {"start": S.RUNNING, "pause": S.PAUSED, "resume": S.RUNNING, "delete": S.DELETED}


@dataclass
class Exit:
    status: int
    at: float  # time.time()

    def timestamp(self) -> timestamp_pb2.Timestamp:
        ts = timestamp_pb2.Timestamp()
        ts.FromNanoseconds(int(self.at * 1e9))
        return ts


@dataclass(eq=False)
class Process:
    container_id: str
    exec_id: str  # "" for the init process
    bundle: str
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    spec: bytes = b""  # an exec's OCI Process (JSON), as ExecProcessRequest.spec carried it
    pid: int = 0
    state: State = State.CREATED
    exit: Exit | None = None
    io: ProcessIO | None = None
    # Serializes lifecycle changes of this process, including applying its exit: an exit that
    # arrives while Start runs is reported only after Start has published its event.
    lock: threading.RLock = field(default_factory=threading.RLock)
    exited: threading.Event = field(default_factory=threading.Event)

    @property
    def is_init(self) -> bool:
        return self.exec_id == ""

    @property
    def name(self) -> str:
        return f"task {self.container_id}" if self.is_init else f"exec {self.exec_id} of {self.container_id}"

    def check(self, action: str) -> None:
        if self.state in ALLOWED[action]:
            return
        if action == "kill" and self.state in (S.STOPPED, S.DELETED):
            raise NotFound(f"{self.name}: process already finished")
        raise FailedPrecondition(f"cannot {action} {self.name}: it is {self.state.value}")

    def advance(self, action: str) -> None:
        """Check `action` is legal, then move to the state it leads to."""
        self.check(action)
        self.state = NEXT.get(action, self.state)

    def set_exited(self, status: int) -> bool:
        """Record the exit; False if it was already recorded."""
        with self.lock:
            if self.exit is not None:
                return False
            self.exit = Exit(status, time.time())
            if self.state is not S.DELETED:
                self.state = S.STOPPED
        self.exited.set()
        return True

    def wait(self, timeout: float | None = None) -> Exit | None:
        self.exited.wait(timeout)
        return self.exit
