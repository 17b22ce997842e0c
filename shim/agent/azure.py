"""Azure spot evictions through Scheduled Events.

GET /metadata/scheduledevents?api-version=2020-07-01 (header Metadata: true) lists pending events; a
spot eviction is EventType "Preempt" with NotBefore (RFC 1123, at least 30 s ahead). Events for other
VMs of the same availability/scale set appear too: only events whose Resources name this VM count.
Once the checkpoints are done the agent POSTs {"StartRequests": [{"EventId": ...}]} so Azure may go
ahead without waiting for NotBefore.
"""

from __future__ import annotations

import email.utils
import json
import logging
import time

from shim.agent import fetch
from shim.agent.notice import MetadataError, Notice, Watcher

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://169.254.169.254"
API_VERSION = "2020-07-01"
EVENTS_PATH = f"/metadata/scheduledevents?api-version={API_VERSION}"
VM_NAME_PATH = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"
INSTANCE_PATH = "/metadata/instance?api-version=2021-02-01"
HEADERS = {"Metadata": "true"}
# An event already Started has an empty NotBefore: the eviction is under way.
STARTED_WINDOW_S = 5.0


def parse_not_before(value: str) -> float | None:
    if not value.strip():
        return None
    return email.utils.parsedate_to_datetime(value).timestamp()


class AzureWatcher(Watcher):
    provider = "azure"

    def __init__(self, base_url: str = DEFAULT_BASE_URL, vm_name: str | None = None, timeout: float = 2.0) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self._vm_name = vm_name
        self._vm_name_known = vm_name is not None

    def _own_name(self) -> str | None:
        """This VM's name, to tell its events from those of its set's neighbours; None if unknown."""
        if not self._vm_name_known:
            try:
                url = fetch.join(self.base_url, VM_NAME_PATH)
                resp = fetch.request("GET", url, headers=HEADERS, timeout=self.timeout)
            except MetadataError as exc:
                log.warning("azure: cannot read this VM's name (%s); will retry", exc)
                return None
            if resp.status == 200 and resp.text.strip():
                self._vm_name = resp.text.strip()
                log.info("azure: this VM is %r", self._vm_name)
            else:
                log.warning("azure: VM name lookup answered %s; acting on every Preempt event", resp.status)
            self._vm_name_known = True
        return self._vm_name

    def poll(self) -> Notice | None:
        resp = fetch.request("GET", fetch.join(self.base_url, EVENTS_PATH), headers=HEADERS, timeout=self.timeout)
        if resp.status != 200:
            raise MetadataError(f"GET {EVENTS_PATH} answered {resp.status}: {resp.text[:200]!r}")
        try:
            doc = json.loads(resp.body)
            events = list(doc.get("Events") or [])
        except (ValueError, TypeError, AttributeError) as exc:
            raise MetadataError(f"unexpected scheduled events document {resp.text[:200]!r}: {exc}") from exc
        own = self._own_name()
        for event in events:
            if not isinstance(event, dict) or event.get("EventType") != "Preempt":
                continue  # Reboot, Redeploy, Freeze, Terminate...: not a spot eviction
            resources = event.get("Resources") or []
            if own is not None and resources and own not in resources:
                continue  # a neighbour's eviction
            event_id = str(event.get("EventId") or "")
            if not event_id:
                raise MetadataError(f"Preempt event without EventId: {event!r}")
            try:
                not_before = parse_not_before(str(event.get("NotBefore") or ""))
            except (TypeError, ValueError) as exc:
                raise MetadataError(f"Preempt event with bad NotBefore {event.get('NotBefore')!r}") from exc
            deadline = not_before if not_before is not None else time.time() + STARTED_WINDOW_S
            return Notice("azure", "preempt", deadline, event, id=f"azure:{event_id}", details={"EventId": event_id})
        return None

    def acknowledge(self, notice: Notice) -> None:
        event_id = notice.details.get("EventId")
        if not event_id:
            return
        body = json.dumps({"StartRequests": [{"EventId": event_id}]}).encode()
        resp = fetch.request(
            "POST",
            fetch.join(self.base_url, EVENTS_PATH),
            headers={**HEADERS, "Content-Type": "application/json"},
            body=body,
            timeout=self.timeout,
        )
        if resp.status not in (200, 201, 202, 204):
            raise MetadataError(f"acknowledging event {event_id} answered {resp.status}: {resp.text[:200]!r}")
        log.info("azure: acknowledged event %s", event_id)


def probe(base_url: str = DEFAULT_BASE_URL, timeout: float = 1.0) -> bool:
    """Azure IMDS answers /metadata/instance with JSON when asked with Metadata: true."""
    try:
        resp = fetch.request("GET", fetch.join(base_url, INSTANCE_PATH), headers=HEADERS, timeout=timeout)
    except MetadataError:
        return False
    if resp.status != 200:
        return False
    try:
        return isinstance(json.loads(resp.body), dict)
    except ValueError:
        return False
