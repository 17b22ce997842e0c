"""GCP spot/preemptible notices: GET /computeMetadata/v1/instance/preempted answers TRUE once the VM is
being preempted; the VM has about 30 seconds from then.

With long-polling the first request is a plain GET (it returns the current value and its ETag at once,
so a preemption that happened before the agent started is seen immediately); later ones add
`?wait_for_change=true&last_etag=<etag>&timeout_sec=<n>`, which the metadata server answers as soon as
the value differs from that ETag, or after timeout_sec with the unchanged value.
"""

from __future__ import annotations

import logging
import time
import urllib.parse

from shim.agent import fetch
from shim.agent.notice import MetadataError, Notice, Watcher

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://metadata.google.internal"
PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
FLAVOR = {"Metadata-Flavor": "Google"}
NOTICE_WINDOW_S = 30.0


class GcpWatcher(Watcher):
    provider = "gcp"

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        wait_for_change: bool = True,
        long_poll_timeout_s: int = 60,
        timeout: float = 2.0,
        notice_window_s: float = NOTICE_WINDOW_S,
    ) -> None:
        self.base_url = base_url
        self.long_poll = wait_for_change
        self.long_poll_timeout_s = long_poll_timeout_s
        self.timeout = timeout
        self.notice_window_s = notice_window_s
        self._etag: str | None = None

    def poll(self) -> Notice | None:
        url = fetch.join(self.base_url, PREEMPTED_PATH)
        timeout = self.timeout
        if self.long_poll and self._etag:
            query = {"wait_for_change": "true", "last_etag": self._etag, "timeout_sec": str(self.long_poll_timeout_s)}
            url += "?" + urllib.parse.urlencode(query)
            timeout = self.long_poll_timeout_s + self.timeout  # the server holds the answer that long
        resp = fetch.request("GET", url, headers=FLAVOR, timeout=timeout)
        if resp.status != 200:
            self._etag = None  # start over with a plain GET
            raise MetadataError(f"GET {PREEMPTED_PATH} answered {resp.status}: {resp.text[:200]!r}")
        self._etag = resp.headers.get("ETag")
        value = resp.text.strip().upper()
        if value == "FALSE":
            return None
        if value != "TRUE":
            raise MetadataError(f"unexpected instance/preempted value {resp.text[:100]!r}")
        return Notice("gcp", "preempt", time.time() + self.notice_window_s, resp.text.strip(), id="gcp:preempted")


def probe(base_url: str = DEFAULT_BASE_URL, timeout: float = 1.0) -> bool:
    """The GCP metadata server answers with the header Metadata-Flavor: Google."""
    try:
        resp = fetch.request("GET", fetch.join(base_url, "/computeMetadata/v1/"), headers=FLAVOR, timeout=timeout)
    except MetadataError:
        return False
    return resp.status == 200 and resp.headers.get("Metadata-Flavor", "") == "Google"
