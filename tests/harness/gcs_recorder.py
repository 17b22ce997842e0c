"""A loopback recorder of the requests the gs:// backend sends, answering the few XML API calls a store
needs (PUT, GET with Range, HEAD, DELETE, list-type=2; no multipart) with GCS's documented precondition
behaviour.

It exists because SeaweedFS (the real server behind the other gs:// tests) ignores
`x-goog-if-generation-match`, so the GCS conditional create could not fail there. It is not Google's
service: it checks the request shape the XML API documents (SigV4 with region "auto", path-style, no
x-amz-checksum headers or aws-chunked bodies) and applies `x-goog-if-generation-match: 0` (create only if
absent, else 412 PreconditionFailed). It does not verify signatures: SeaweedFS does that in the other tests.
With `bearer_ok` it also takes `Authorization: Bearer TOKEN` for the tokens that function accepts (401
otherwise), as the XML API takes OAuth 2.0 access tokens.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

_AUTH = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request, "
    r"SignedHeaders=(?P<signed>[a-z0-9;-]+), Signature=[0-9a-f]{64}$"
)
# What the XML API does not take from an S3 client (botocore >= 1.36 sends them unless told not to).
_REFUSED_HEADER = re.compile(r"^x-amz-(checksum-.*|sdk-checksum-algorithm|trailer)$", re.IGNORECASE)


_PRECONDITION_FAILED = "At least one of the pre-conditions you specified did not hold."


@dataclass
class Seen:
    method: str
    path: str
    headers: Message
    status: int = 0
    signed: set[str] = field(default_factory=set)
    region: str = ""
    bearer: str = ""


class GCSRecorder:
    def __init__(self, bucket: str, bearer_ok: Callable[[str], bool] | None = None) -> None:
        self.bucket = bucket
        self.bearer_ok = bearer_ok
        self.objects: dict[str, tuple[bytes, float, int]] = {}  # key -> (body, mtime, generation)
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.generation = 0
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_PUT(self) -> None:
                recorder._handle(self, "PUT")

            def do_GET(self) -> None:
                recorder._handle(self, "GET")

            def do_HEAD(self) -> None:
                recorder._handle(self, "HEAD")

            def do_DELETE(self) -> None:
                recorder._handle(self, "DELETE")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> GCSRecorder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _reply(self, h: BaseHTTPRequestHandler, seen: Seen, status: int, body: bytes = b"", **headers: str) -> None:
        seen.status = status
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            h.send_header(k.replace("_", "-"), v)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def _error(self, h: BaseHTTPRequestHandler, seen: Seen, status: int, code: str, message: str) -> None:
        body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{escape(message)}</Message>"
        body += "</Error>"
        self._reply(h, seen, status, body.encode(), Content_Type="application/xml")

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        seen = Seen(method, h.path, h.headers)
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        with self.lock:
            self.seen.append(seen)
        authorization = h.headers.get("Authorization", "")
        auth = _AUTH.match(authorization)
        if self.bearer_ok is not None and authorization.startswith("Bearer "):
            seen.bearer = authorization.removeprefix("Bearer ")
            if not self.bearer_ok(seen.bearer):
                return self._error(h, seen, 401, "AuthenticationRequired", "Invalid Credentials")
        elif not auth:
            return self._error(h, seen, 403, "AccessDenied", "no SigV4 Authorization header")
        else:
            seen.signed, seen.region = set(auth["signed"].split(";")), auth["region"]
        refused = [k for k in h.headers if _REFUSED_HEADER.match(k)]
        if refused or "aws-chunked" in h.headers.get("Content-Encoding", ""):
            return self._error(h, seen, 400, "InvalidArgument", f"unsupported header(s) {refused}")
        url = urlsplit(h.path)
        bucket, _, key = url.path.lstrip("/").partition("/")
        key = unquote(key)
        if bucket != self.bucket:  # path-style only: the bucket is the first path segment
            return self._error(h, seen, 404, "NoSuchBucket", f"no bucket {bucket!r}")
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        with self.lock:
            if method == "GET" and not key:
                return self._list(h, seen, query)
            if method == "PUT":
                match = h.headers.get("x-goog-if-generation-match")
                if match is not None and match != (str(self.objects[key][2]) if key in self.objects else "0"):
                    return self._error(h, seen, 412, "PreconditionFailed", _PRECONDITION_FAILED)
                self.generation += 1
                self.objects[key] = (body, time.time(), self.generation)
                return self._reply(h, seen, 200, ETag=f'"{self.generation}"', x_goog_generation=str(self.generation))
            if key not in self.objects:
                if method == "DELETE":
                    return self._reply(h, seen, 204)
                return self._error(h, seen, 404, "NoSuchKey", "The specified key does not exist.")
            data, mtime, gen = self.objects[key]
            if method == "DELETE":
                del self.objects[key]
                return self._reply(h, seen, 204)
            modified = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(mtime))
            headers = {"ETag": f'"{gen}"', "Last_Modified": modified, "Content_Type": "application/octet-stream"}
            if method == "HEAD":
                seen.status = 200
                h.send_response(200)
                h.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    h.send_header(k.replace("_", "-"), v)
                h.end_headers()
                return None
            rng = re.fullmatch(r"bytes=(\d+)-(\d+)", h.headers.get("Range", ""))
            if rng:
                first, last = int(rng[1]), min(int(rng[2]), len(data) - 1)
                if first > last:
                    return self._error(h, seen, 416, "InvalidRange", "The requested range cannot be satisfied.")
                headers["Content_Range"] = f"bytes {first}-{last}/{len(data)}"
                return self._reply(h, seen, 206, data[first : last + 1], **headers)
            return self._reply(h, seen, 200, data, **headers)

    def _list(self, h: BaseHTTPRequestHandler, seen: Seen, query: dict[str, str]) -> None:
        if query.get("list-type") != "2":
            return self._error(h, seen, 400, "InvalidArgument", "this recorder lists with list-type=2 only")
        prefix = query.get("prefix", "")
        rows = []
        for key in sorted(k for k in self.objects if k.startswith(prefix)):
            data, mtime, gen = self.objects[key]
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(mtime))
            rows.append(
                f"<Contents><Key>{escape(key)}</Key><LastModified>{stamp}</LastModified>"
                f'<ETag>"{gen}"</ETag><Size>{len(data)}</Size><StorageClass>STANDARD</StorageClass></Contents>'
            )
        doc = (
            '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<Name>{self.bucket}</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{len(rows)}</KeyCount>"
            f"<MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>{''.join(rows)}</ListBucketResult>"
        )
        return self._reply(h, seen, 200, doc.encode(), Content_Type="application/xml")
