"""Minimal HTTP for metadata services: plain urllib, never through a proxy, errors as data."""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import Message

from shim.agent.notice import MetadataError

# Metadata services live on link-local addresses; an http_proxy from the environment must not apply.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Response:
    status: int
    headers: Message
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


def request(
    method: str,
    url: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 2.0,
) -> Response:
    """One request; any HTTP status comes back as a Response, transport failures raise MetadataError."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return Response(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            data = exc.read() if exc.fp is not None else b""
        return Response(exc.code, exc.headers, data)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise MetadataError(f"{method} {url}: {reason}") from exc


def join(base: str, path: str) -> str:
    return base.rstrip("/") + "/" + path.lstrip("/")
