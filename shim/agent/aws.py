"""AWS EC2 spot notices through IMDSv2 (session tokens).

GET /latest/meta-data/spot/instance-action answers 404 until EC2 schedules the interruption, then
{"action": "terminate|stop|hibernate", "time": "2026-11-26T18:00:00Z"} about two minutes ahead.
GET /latest/meta-data/events/recommendations/rebalance answers {"noticeTime": "..."} when the instance
is at elevated risk: an advisory notice (leave-running checkpoint, the task goes on).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time

from shim.agent import fetch
from shim.agent.notice import MetadataError, Notice, Watcher

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
INSTANCE_ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"


def parse_time(value: str) -> float:
    """IMDS timestamps are ISO 8601 in UTC, e.g. 2017-09-18T08:22:00Z."""
    t = dt.datetime.fromisoformat(value.strip())
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


class AwsWatcher(Watcher):
    provider = "aws"

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        token_ttl_s: int = 21600,
        timeout: float = 2.0,
        advisory_window_s: float = 120.0,
    ) -> None:
        self.base_url = base_url
        self.token_ttl_s = token_ttl_s
        self.timeout = timeout
        # A rebalance recommendation carries no deadline; its leave-running checkpoint gets this long.
        self.advisory_window_s = advisory_window_s
        self._token: str | None = None
        self._token_expires = 0.0  # time.monotonic()

    # ---- tokens --------------------------------------------------------------------------------

    def _fetch_token(self) -> str:
        resp = fetch.request(
            "PUT",
            fetch.join(self.base_url, TOKEN_PATH),
            headers={TOKEN_TTL_HEADER: str(self.token_ttl_s)},
            timeout=self.timeout,
        )
        if resp.status != 200 or not resp.body.strip():
            raise MetadataError(f"IMDSv2 token request answered {resp.status}: {resp.text[:200]!r}")
        self._token = resp.text.strip()
        # Renew well before expiry so a poll never races the token's end.
        self._token_expires = time.monotonic() + max(1.0, self.token_ttl_s * 0.8)
        log.debug("aws: new IMDSv2 token, ttl %ss", self.token_ttl_s)
        return self._token

    def _token_now(self) -> str:
        if self._token is None or time.monotonic() >= self._token_expires:
            return self._fetch_token()
        return self._token

    def _get(self, path: str) -> fetch.Response:
        url = fetch.join(self.base_url, path)
        resp = fetch.request("GET", url, headers={TOKEN_HEADER: self._token_now()}, timeout=self.timeout)
        if resp.status == 401:  # expired or revoked token (e.g. IMDS restarted): renew once
            log.info("aws: IMDSv2 token rejected, renewing it")
            self._token = None
            resp = fetch.request("GET", url, headers={TOKEN_HEADER: self._token_now()}, timeout=self.timeout)
        return resp

    # ---- notices -------------------------------------------------------------------------------

    def poll(self) -> Notice | None:
        return self._instance_action() or self._rebalance()

    def _instance_action(self) -> Notice | None:
        resp = self._get(INSTANCE_ACTION_PATH)
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise MetadataError(f"GET {INSTANCE_ACTION_PATH} answered {resp.status}: {resp.text[:200]!r}")
        try:
            doc = json.loads(resp.body)
            action = str(doc["action"]).lower()
            deadline = parse_time(str(doc["time"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise MetadataError(f"unexpected spot/instance-action document {resp.text[:200]!r}: {exc}") from exc
        return Notice("aws", action, deadline, doc, id=f"aws:instance-action:{action}:{doc['time']}")

    def _rebalance(self) -> Notice | None:
        resp = self._get(REBALANCE_PATH)
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise MetadataError(f"GET {REBALANCE_PATH} answered {resp.status}: {resp.text[:200]!r}")
        try:
            doc = json.loads(resp.body)
            notice_time = str(doc["noticeTime"])
        except (ValueError, KeyError, TypeError) as exc:
            raise MetadataError(f"unexpected rebalance document {resp.text[:200]!r}: {exc}") from exc
        deadline = time.time() + self.advisory_window_s
        return Notice("aws", "rebalance", deadline, doc, id=f"aws:rebalance:{notice_time}")


def probe(base_url: str = DEFAULT_BASE_URL, timeout: float = 1.0) -> bool:
    """An IMDSv2 endpoint hands out a session token for a PUT; nothing else does."""
    try:
        resp = fetch.request("PUT", fetch.join(base_url, TOKEN_PATH), headers={TOKEN_TTL_HEADER: "60"}, timeout=timeout)
    except MetadataError:
        return False
    return resp.status == 200 and bool(resp.body.strip())
