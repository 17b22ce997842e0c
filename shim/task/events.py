"""Task events to containerd: `containerd.services.events.ttrpc.v1.Events/Forward` on TTRPC_ADDRESS.

One queue and one sender thread keep events in the order the shim produced them (start before exit,
exit before delete). A containerd that is down or restarting is retried until it is back.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message

from revenant_pb.containerd.services.events.ttrpc.v1 import events_pb2
from shim.ttrpc import NAMESPACE_KEY, Client, ServiceClient, TtrpcError

log = logging.getLogger(__name__)

EVENTS_API = events_pb2.DESCRIPTOR.services_by_name["Events"]
RETRY_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
GIVE_UP_AFTER = 300.0  # a containerd away for 5 minutes will not want these events any more

TOPICS = {
    "TaskCreate": "/tasks/create",
    "TaskStart": "/tasks/start",
    "TaskExit": "/tasks/exit",
    "TaskDelete": "/tasks/delete",
    "TaskExecAdded": "/tasks/exec-added",
    "TaskExecStarted": "/tasks/exec-started",
    "TaskPaused": "/tasks/paused",
    "TaskResumed": "/tasks/resumed",
    "TaskOOM": "/tasks/oom",
    "TaskCheckpointed": "/tasks/checkpointed",
}


def pack_any(msg: Message) -> any_pb2.Any:
    # containerd's typeurl names gogo messages by their bare full name (no type.googleapis.com/).
    return any_pb2.Any(type_url=msg.DESCRIPTOR.full_name, value=msg.SerializeToString())


def now_timestamp() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


class Publisher:
    def __init__(self, address: str, namespace: str) -> None:
        self.address, self.namespace = address, namespace
        self._queue: queue.Queue[events_pb2.Envelope | None] = queue.Queue()
        self._client: Client | None = None
        self._events: ServiceClient | None = None
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self._thread.start()

    def publish(self, event: Message, topic: str | None = None) -> None:
        """Send a task event (topic from its type), or any message under an explicit topic."""
        topic = topic or TOPICS[event.DESCRIPTOR.name]
        env = events_pb2.Envelope(
            timestamp=now_timestamp(), namespace=self.namespace, topic=topic, event=pack_any(event)
        )
        log.debug("event %s %s", topic, str(event).replace("\n", " "))
        self._queue.put(env)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (bounded by timeout), then stop."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self._client is not None:
            self._client.close()

    def _run(self) -> None:
        while (env := self._queue.get()) is not None:
            self._send(env)

    def _send(self, env: events_pb2.Envelope) -> None:
        if not self.address:
            return
        deadline = time.monotonic() + GIVE_UP_AFTER
        attempt = 0
        while True:
            try:
                if self._client is None or self._events is None or self._client.closed:
                    self._client = Client(self.address, timeout=10.0)
                    self._events = ServiceClient(self._client, EVENTS_API, {NAMESPACE_KEY: self.namespace})
                self._events.Forward(events_pb2.ForwardRequest(envelope=env))
                return
            except (OSError, ConnectionError, TtrpcError) as e:
                if self._client is not None:
                    self._client.close()
                    self._client, self._events = None, None
                if time.monotonic() > deadline:
                    log.error("dropping event %s after %.0fs: %s", env.topic, GIVE_UP_AFTER, e)
                    return
                delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
                log.warning("forwarding %s to %s failed (%s); retrying in %.2fs", env.topic, self.address, e, delay)
                attempt += 1
                time.sleep(delay)
