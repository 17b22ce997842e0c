"""A local cloud metadata server on 127.0.0.1 serving AWS IMDSv2, GCP and Azure IMDS spot-notice endpoints
with the documented paths, headers and bodies (see shared/docs/environment.md), for the agent's tests
and the demo. Each provider can be switched off (its paths then answer 404, as on another cloud).

Run standalone for the demo: `python -m harness.metadata_server --port 0` prints its URL; it then reads
commands on stdin: `aws-terminate SECONDS`, `aws-rebalance`, `gcp-preempt`, `azure-preempt SECONDS`.
"""

from __future__ import annotations

import argparse
import email.utils
import json
import secrets
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PROVIDERS = ("aws", "gcp", "azure")


@dataclass
class Seen:
    method: str
    path: str  # with query
    headers: Message  # case-insensitive, as HTTP header names are
    body: bytes = b""


@dataclass
class MetadataState:
    providers: set[str] = field(default_factory=lambda: set(PROVIDERS))
    # AWS
    aws_tokens: dict[str, float] = field(default_factory=dict)  # token -> time.monotonic() expiry
    aws_instance_action: dict[str, str] | None = None
    aws_rebalance: dict[str, str] | None = None
    # GCP
    gcp_preempted: bool = False
    gcp_etag_n: int = 1
    gcp_waiting: int = 0  # long-polls currently held open
    gcp_token_ttl: int = 3599  # expires_in of the service-account tokens handed out
    gcp_tokens: list[str] = field(default_factory=list)  # every access token handed out, oldest first
    # Azure
    azure_vm_name: str = "revenant-vm-0"
    azure_incarnation: int = 1
    azure_events: list[dict[str, Any]] = field(default_factory=list)
    azure_acks: list[dict[str, Any]] = field(default_factory=list)


def aws_time(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class MetadataServer:
    def __init__(self, providers: tuple[str, ...] | set[str] = PROVIDERS, host: str = "127.0.0.1", port: int = 0):
        self.state = MetadataState(providers=set(providers))
        self.cond = threading.Condition()
        self.seen: list[Seen] = []
        # Ordered log of notable things ("azure-ack <id>", ...) that tests compare with other logs.
        self.timeline: list[str] | None = None
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="metadata-server", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> MetadataServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.cond.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> MetadataServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- scenario controls ---------------------------------------------------------------------

    def aws_terminate(self, in_s: float, action: str = "terminate") -> float:
        """Announce an EC2 spot interruption `in_s` from now; returns the (whole-second) deadline."""
        deadline = float(int(time.time() + in_s))
        with self.cond:
            self.state.aws_instance_action = {"action": action, "time": aws_time(deadline)}
        return deadline

    def aws_rebalance_now(self) -> None:
        with self.cond:
            self.state.aws_rebalance = {"noticeTime": aws_time(time.time())}

    def aws_expire_tokens(self) -> None:
        with self.cond:
            self.state.aws_tokens.clear()

    def gcp_set_preempted(self, value: bool = True) -> None:
        with self.cond:
            if self.state.gcp_preempted != value:
                self.state.gcp_preempted = value
                self.state.gcp_etag_n += 1
            self.cond.notify_all()

    def azure_add_event(
        self, event_type: str = "Preempt", in_s: float = 30.0, resources: list[str] | None = None
    ) -> dict[str, Any]:
        event = {
            "EventId": secrets.token_hex(8).upper(),
            "EventStatus": "Scheduled",
            "EventType": event_type,
            "ResourceType": "VirtualMachine",
            "Resources": resources if resources is not None else [self.state.azure_vm_name],
            "NotBefore": email.utils.formatdate(time.time() + in_s, usegmt=True),
            "Description": "",
            "EventSource": "Platform",
            "DurationInSeconds": -1 if event_type == "Preempt" else 10,
        }
        with self.cond:
            self.state.azure_events.append(event)
            self.state.azure_incarnation += 1
        return event

    def requests_to(self, prefix: str) -> list[Seen]:
        with self.cond:
            return [s for s in self.seen if s.path.startswith(prefix)]

    def wait_until(self, predicate: Any, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        with self.cond:
            while not predicate(self.state):
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.1))
            return True

    def _note(self, entry: str) -> None:
        if self.timeline is not None:
            self.timeline.append(entry)

    # ---- HTTP ----------------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _send(self, code: int, body: bytes | str = b"", headers: dict[str, str] | None = None) -> None:
                data = body.encode() if isinstance(body, str) else body
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _dispatch(self) -> None:
                body = self._body()
                with server.cond:
                    server.seen.append(Seen(self.command, self.path, self.headers, body))
                    server.cond.notify_all()
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                enabled = server.state.providers
                if url.path.startswith("/latest/") and "aws" in enabled:
                    self._aws(url.path)
                elif url.path.startswith("/computeMetadata/") and "gcp" in enabled:
                    self._gcp(url.path, query)
                elif url.path.startswith("/metadata/") and "azure" in enabled:
                    self._azure(url.path, query, body)
                else:
                    self._send(404, "Not Found")

            do_GET = do_PUT = do_POST = _dispatch

            # AWS IMDSv2: https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/configuring-instance-metadata-service.html
            def _aws(self, path: str) -> None:
                st = server.state
                if path == "/latest/api/token":
                    if self.command != "PUT":
                        self._send(405, "Method Not Allowed")
                        return
                    try:
                        ttl = int(self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", ""))
                    except ValueError:
                        ttl = 0
                    if not 1 <= ttl <= 21600:
                        self._send(400, "Bad Request")
                        return
                    token = secrets.token_urlsafe(32)
                    with server.cond:
                        st.aws_tokens[token] = time.monotonic() + ttl
                    self._send(200, token, {"X-aws-ec2-metadata-token-ttl-seconds": str(ttl)})
                    return
                token = self.headers.get("X-aws-ec2-metadata-token", "")
                with server.cond:
                    valid = st.aws_tokens.get(token, 0.0) > time.monotonic()
                if not valid:  # IMDSv2 required: no token or an expired one
                    self._send(401, "Unauthorized")
                    return
                doc = None
                if path == "/latest/meta-data/spot/instance-action":
                    doc = st.aws_instance_action
                elif path == "/latest/meta-data/events/recommendations/rebalance":
                    doc = st.aws_rebalance
                if doc is None:
                    self._send(404, "Not Found")
                else:
                    self._send(200, json.dumps(doc), {"Content-Type": "text/plain"})

            # GCP: https://cloud.google.com/compute/docs/metadata/querying-metadata (wait_for_change, ETags)
            def _gcp(self, path: str, query: dict[str, str]) -> None:
                st = server.state
                if self.headers.get("Metadata-Flavor") != "Google":
                    self._send(403, "Missing Metadata-Flavor:Google header.", {"Metadata-Flavor": "Google"})
                    return
                flavor = {"Metadata-Flavor": "Google", "Content-Type": "application/text"}
                if path in ("/computeMetadata/v1/", "/computeMetadata/v1"):
                    self._send(200, "instance/\nproject/\n", flavor)
                    return
                if path == "/computeMetadata/v1/instance/service-accounts/default/token":
                    # https://cloud.google.com/compute/docs/access/authenticate-workloads (the access token doc)
                    with server.cond:
                        st.gcp_tokens.append("ya29." + secrets.token_urlsafe(48))
                        token, ttl = st.gcp_tokens[-1], st.gcp_token_ttl
                    doc = {"access_token": token, "expires_in": ttl, "token_type": "Bearer"}
                    self._send(200, json.dumps(doc), {**flavor, "Content-Type": "application/json"})
                    return
                if path != "/computeMetadata/v1/instance/preempted":
                    self._send(404, "Not Found", flavor)
                    return
                with server.cond:
                    if query.get("wait_for_change") == "true":
                        last = query.get("last_etag") or f"etag-{st.gcp_etag_n}"
                        end = time.monotonic() + float(query.get("timeout_sec") or 300)
                        st.gcp_waiting += 1
                        server.cond.notify_all()
                        try:
                            while f"etag-{st.gcp_etag_n}" == last and time.monotonic() < end:
                                server.cond.wait(min(0.2, max(0.0, end - time.monotonic())))
                        finally:
                            st.gcp_waiting -= 1
                    value = "TRUE" if st.gcp_preempted else "FALSE"
                    etag = f"etag-{st.gcp_etag_n}"
                self._send(200, value, {**flavor, "ETag": etag})

            # Azure: https://learn.microsoft.com/azure/virtual-machines/linux/scheduled-events
            def _azure(self, path: str, query: dict[str, str], body: bytes) -> None:
                st = server.state
                if self.headers.get("Metadata") != "true" or "api-version" not in query:
                    self._send(400, json.dumps({"error": "Bad request. Required metadata header not specified"}))
                    return
                if path == "/metadata/instance" and self.command == "GET":
                    doc = {"compute": {"name": st.azure_vm_name, "priority": "Spot"}, "network": {}}
                    self._send(200, json.dumps(doc), {"Content-Type": "application/json"})
                elif path == "/metadata/instance/compute/name" and self.command == "GET":
                    self._send(200, st.azure_vm_name, {"Content-Type": "text/plain"})
                elif path == "/metadata/scheduledevents" and self.command == "GET":
                    with server.cond:
                        doc = {"DocumentIncarnation": st.azure_incarnation, "Events": list(st.azure_events)}
                    self._send(200, json.dumps(doc), {"Content-Type": "application/json"})
                elif path == "/metadata/scheduledevents" and self.command == "POST":
                    try:
                        req = json.loads(body)
                        ids = [r["EventId"] for r in req["StartRequests"]]
                    except (ValueError, KeyError, TypeError):
                        self._send(400, json.dumps({"error": "Bad request"}))
                        return
                    with server.cond:
                        known = {e["EventId"] for e in st.azure_events}
                        if not ids or any(i not in known for i in ids):
                            self._send(400, json.dumps({"error": "Unknown EventId"}))
                            return
                        st.azure_acks.append(req)
                        for e in st.azure_events:
                            if e["EventId"] in ids:
                                e["EventStatus"], e["NotBefore"] = "Started", ""
                        st.azure_incarnation += 1
                        for i in ids:
                            server._note(f"azure-ack {i}")
                        server.cond.notify_all()
                    self._send(200)
                else:
                    self._send(404, "Not Found")

        return Handler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    srv = MetadataServer(host=args.host, port=args.port).start()
    print(srv.url, flush=True)
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "aws-terminate":
            srv.aws_terminate(float(rest[0]) if rest else 120)
        elif cmd == "aws-rebalance":
            srv.aws_rebalance_now()
        elif cmd == "gcp-preempt":
            srv.gcp_set_preempted(True)
        elif cmd == "azure-preempt":
            srv.azure_add_event("Preempt", float(rest[0]) if rest else 30)
        print("ok", cmd, flush=True)
    srv.stop()


if __name__ == "__main__":
    main()
