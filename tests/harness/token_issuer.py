"""A Docker token-spec auth server on 127.0.0.1, standing in for GHCR's or Docker Hub's.

The registry that trusts it is the real `docker-registry` (`auth: token:`, config from `registry_auth()`);
this issuer checks Basic credentials (GET) or an OAuth2 refresh token (POST grant_type=refresh_token),
and signs RS256 JWTs with an x5c header whose certificate is the registry's rootcertbundle. It grants
a user the actions it asks for on any repository; anonymous requests get a token with no access.
Everything asked of it is kept in `requests` for tests to check (scopes, who, which grant).
"""

from __future__ import annotations

import base64
import datetime
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

ISSUER = "revenant-test-issuer"
SERVICE = "revenant-test-registry"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenRequest:
    method: str
    user: str | None  # None: anonymous
    grant: str  # "basic", "refresh_token" or "anonymous"
    service: str
    scopes: list[str]


@dataclass
class TokenIssuer:
    root: Path
    users: dict[str, str] = field(default_factory=lambda: {"alice": "alice-secret"})
    refresh_tokens: dict[str, str] = field(default_factory=lambda: {"alice-refresh-token": "alice"})
    expires_in: int = 300  # what the answer says
    pull_only: int = 0  # this many next tokens grant pull only, whatever was asked (the registry refuses a push)
    requests: list[TokenRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = self.root / "issuer.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self.server.server_address[1]
        self.realm = f"http://127.0.0.1:{self.port}/token"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def registry_auth(self) -> str:
        """The registry config's `auth:` section that trusts this issuer."""
        return (
            f"  token:\n    realm: {self.realm}\n    service: {SERVICE}\n    issuer: {ISSUER}\n"
            f"    rootcertbundle: {self.cert_path}\n"
        )

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def sign(self, user: str | None, scopes: list[str], pull_only: bool = False) -> str:
        access = []
        if user is not None:
            for scope in scopes:
                kind, _, rest = scope.partition(":")
                repo, _, actions = rest.rpartition(":")
                if kind == "repository" and repo:
                    access.append(
                        {"type": kind, "name": repo, "actions": ["pull"] if pull_only else actions.split(",")}
                    )
        now = int(time.time())
        header = {
            "typ": "JWT",
            "alg": "RS256",
            "x5c": [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()],
        }
        claims = {
            "iss": ISSUER,
            "sub": user or "",
            "aud": SERVICE,
            "exp": now + self.expires_in,
            "nbf": now - 900,
            "iat": now - 900,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, status: int, doc: dict) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _issue(self, method: str, params: dict[str, list[str]], user: str | None, grant: str) -> None:
                scopes = params.get("scope", [])
                service = (params.get("service") or [""])[0]
                with issuer._lock:
                    issuer.requests.append(TokenRequest(method, user, grant, service, scopes))
                    pull_only = issuer.pull_only > 0
                    issuer.pull_only -= 1 if pull_only else 0
                token = issuer.sign(user, scopes, pull_only)
                name = "access_token" if grant == "refresh_token" else "token"
                self._answer(200, {name: token, "expires_in": issuer.expires_in})

            def do_GET(self) -> None:
                u = urlsplit(self.path)
                if u.path != "/token":
                    self._answer(404, {})
                    return
                params = parse_qs(u.query)
                auth = self.headers.get("Authorization", "")
                if not auth:
                    self._issue("GET", params, None, "anonymous")
                    return
                scheme, _, value = auth.partition(" ")
                try:
                    user, _, password = base64.b64decode(value).decode().partition(":")
                except ValueError:
                    user, password = "", ""
                if scheme != "Basic" or issuer.users.get(user) != password:
                    self._answer(401, {"errors": [{"code": "UNAUTHORIZED"}]})
                    return
                self._issue("GET", params, user, "basic")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                params = parse_qs(self.rfile.read(length).decode())
                user = issuer.refresh_tokens.get((params.get("refresh_token") or [""])[0])
                if (params.get("grant_type") or [""])[0] != "refresh_token" or user is None:
                    self._answer(401, {"error": "invalid_grant"})
                    return
                self._issue("POST", params, user, "refresh_token")

        return Handler
