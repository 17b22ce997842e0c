"""gs:// backend: Google Cloud Storage through its XML API, which speaks the S3 protocol with HMAC keys.

gs://BUCKET/PREFIX[?endpoint=URL][&multipart_mb=N][&pack_mb=N][&packs=0]
(+ hmac_key_id=, hmac_secret_file= or auth=metadata, which the node config's [gcs] section adds)

Everything but the points below is the S3 backend (s3.py): the same objects, packs, manifests, locks
and owner epochs, with the same retry and error handling.
- Endpoint https://storage.googleapis.com, SigV4 with region "auto", path-style requests (a dotted
  bucket name would not match the wildcard certificate of a virtual-hosted name).
- Credentials: an HMAC key only, never the AWS chain (no AWS_* variables, ~/.aws or instance roles: an
  AWS key must not be offered to another service). First `hmac_key_id=` + `hmac_secret_file=` (the node
  config's [gcs] section adds them to gs:// URLs, as [registry] adds auth_file; an annotation URL may
  not), else GS_ACCESS_KEY_ID + GS_SECRET_ACCESS_KEY from the environment (the names gsutil's boto
  used). The secret file is a regular file of this user's that no group or other may read.
- Or, with `auth=metadata` ([gcs] auth = "metadata"; GKE workload identity, a VM's service account): no
  HMAC key, requests go unsigned with `Authorization: Bearer <token>` (the XML API takes OAuth 2.0 access
  tokens). The token comes from the metadata server's service-accounts/default/token (header
  Metadata-Flavor: Google; host metadata.google.internal, or $GCE_METADATA_HOST as google-auth reads it),
  is checked (size, characters, type, lifetime) and reused until a minute before it expires.
- Only the checksums an operation requires (botocore >= 1.36 otherwise adds x-amz-checksum-* and
  aws-chunked uploads, which the XML API does not take).
- Conditional create (owner epochs): the XML API's documented `x-goog-if-generation-match: 0` (create
  only if no live object has the name; 412 otherwise) instead of S3's `If-None-Match: *`. The header is
  put in before the request is signed, so it is covered by the signature. The S3 backend's probe still
  runs once: a server that ignores the header (an S3 server behind `endpoint=`) gets the one-name-per-
  claim scheme instead, with a warning.
- `endpoint=` (tests, private endpoints): https, or plain http to a loopback address only.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore import UNSIGNED
from botocore.config import Config

from shim.hosts import is_loopback

from ..errors import StoreError
from ..private_file import read_private_file
from .base import TransientError
from .s3 import S3Backend

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://storage.googleapis.com"
REGION = "auto"  # what GCS expects in the SigV4 credential scope
ENV_KEY_ID = "GS_ACCESS_KEY_ID"
ENV_SECRET = "GS_SECRET_ACCESS_KEY"
# The options a gs:// URL may carry (key_file and allow_plaintext are read by shim.store.open_store).
OPTIONS = frozenset(
    {"endpoint", "multipart_mb", "pack_mb", "packs", "hmac_key_id", "hmac_secret_file", "auth"}
    | {"key_file", "allow_plaintext"}
)
METADATA_HOST = "metadata.google.internal"
METADATA_HOST_ENV = "GCE_METADATA_HOST"
TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
MAX_TOKEN_DOC = 64 << 10
MAX_TOKEN = 4096
TOKEN_MARGIN_S = 60.0  # a token is renewed this long before the metadata server said it expires
_TOKEN_OK = re.compile(r"^[\x21-\x7e]+$")  # visible ASCII: nothing that could split a header
_METADATA_HOST_OK = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?$")
MAX_SECRET_FILE = 4096
_KEY_ID_OK = re.compile(r"^[A-Za-z0-9]{4,128}$")  # GCS access IDs are GOOG1... (61 characters), alphanumeric
_SECRET_OK = re.compile(r"^[A-Za-z0-9+/=_-]{8,256}$")  # GCS secrets are 40 characters of base64
_BUCKET_CHARS = re.compile(r"^[a-z0-9][a-z0-9._-]*[a-z0-9]$")


def check_bucket_name(name: str) -> None:
    """GCS's bucket naming rules (cloud.google.com/storage/docs/buckets#naming)."""
    why = None
    if not _BUCKET_CHARS.match(name):
        why = "lower-case letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
    elif "." in name:
        if len(name) > 222 or any(not 1 <= len(part) <= 63 for part in name.split(".")):
            why = "a dotted name is at most 222 characters, each dot-separated part 1 to 63"
        else:
            try:
                ipaddress.IPv4Address(name)
                why = "an IP address is not a bucket name"
            except ValueError:
                pass
    elif not 3 <= len(name) <= 63:
        why = "3 to 63 characters"
    if why is None and (name.startswith("goog") or "google" in name or "g00gle" in name):
        why = "a name may not start with 'goog' or contain 'google'"
    if why:
        raise StoreError(f"gs://{name[:80]}: not a GCS bucket name ({why})")


def check_endpoint(endpoint: str) -> str:
    """https://HOST[:PORT], or http:// to a loopback address (a test server): an HMAC-signed request
    over plain http to anywhere else would expose the store's data."""
    try:
        ep = urlsplit(endpoint)
        host = ep.hostname
        ep.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise StoreError(f"gs endpoint {endpoint!r} is not a URL") from None
    if ep.scheme not in ("http", "https") or not host or ep.path not in ("", "/") or ep.query or ep.fragment:
        raise StoreError(f"gs endpoint {endpoint!r}: expected https://HOST[:PORT]")
    if "@" in ep.netloc:
        raise StoreError(f"gs endpoint {endpoint!r}: no user@ part (credentials stay out of URLs)")
    if ep.scheme == "http" and not is_loopback(host):
        raise StoreError(f"gs endpoint {endpoint!r}: plain http only to a loopback address; use https")
    return endpoint.rstrip("/")


def read_secret_file(path: Path) -> str:
    """The HMAC secret: a regular file owned by this user, closed to group and others, one line of text."""
    raw = read_private_file(path, "gs HMAC secret file", MAX_SECRET_FILE, absolute=True)
    try:
        secret = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise StoreError(f"gs HMAC secret file {path}: not ASCII text") from None
    if not _SECRET_OK.match(secret):  # the message never quotes the file's content
        raise StoreError(f"gs HMAC secret file {path}: not an HMAC secret (one line of base64, 8 to 256 characters)")
    return secret


def hmac_credentials(query: dict[str, str]) -> tuple[str, str, str]:
    """(access id, secret, where they came from): the URL's node-config options, else the environment."""
    key_id, secret_file = query.get("hmac_key_id"), query.get("hmac_secret_file")
    if key_id or secret_file:
        if not (key_id and secret_file):
            raise StoreError("gs: hmac_key_id and hmac_secret_file go together ([gcs] in the node config)")
        source = f"hmac_secret_file {secret_file}"
        secret = read_secret_file(Path(secret_file))
    else:
        key_id, secret = os.environ.get(ENV_KEY_ID, ""), os.environ.get(ENV_SECRET, "")
        if not (key_id and secret):
            raise StoreError(
                f"gs: no HMAC key: set [gcs] hmac_key_id and hmac_secret_file in the node config, "
                f"or {ENV_KEY_ID} and {ENV_SECRET}"
            )
        source = "the environment"
        if not _SECRET_OK.match(secret):
            raise StoreError(f"gs: {ENV_SECRET} is not an HMAC secret (base64, 8 to 256 characters)")
    if not _KEY_ID_OK.match(key_id):
        raise StoreError(f"gs: HMAC access id from {source} is not one (letters and digits, 4 to 128)")
    return key_id, secret, source


def _generation_precondition(request: Any, **_: Any) -> None:
    """S3's create-only header as the XML API's (run before signing, so the signature covers it)."""
    if request.headers.get("If-None-Match") == "*":
        del request.headers["If-None-Match"]
        request.headers["x-goog-if-generation-match"] = "0"


class MetadataToken:
    """OAuth 2.0 access tokens of the instance's service account from the metadata server, cached."""

    def __init__(self, host: str) -> None:
        if not _METADATA_HOST_OK.match(host):
            raise StoreError(f"gs: metadata server {host[:80]!r} is not HOST[:PORT]")
        self.url = f"http://{host}{TOKEN_PATH}"
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
        self._lock = threading.Lock()
        self._token = ""
        self._renew_at = 0.0

    def get(self) -> str:
        with self._lock:
            if not self._token or time.monotonic() >= self._renew_at:
                self._token, ttl = self._fetch()
                self._renew_at = time.monotonic() + max(ttl - TOKEN_MARGIN_S, ttl / 2)
            return self._token

    def _fetch(self) -> tuple[str, float]:
        what = f"gs: service-account token from {self.url}"
        req = urllib.request.Request(self.url, headers={"Metadata-Flavor": "Google"})
        try:
            with self._opener.open(req, timeout=5) as resp:
                flavor = resp.headers.get("Metadata-Flavor")
                raw = resp.read(MAX_TOKEN_DOC + 1)
        except urllib.error.HTTPError as e:
            if e.code >= 500 or e.code == 429:
                raise TransientError(f"{what}: HTTP {e.code}") from None
            raise StoreError(f"{what}: HTTP {e.code} (no service account on this instance?)") from None
        except (OSError, urllib.error.URLError) as e:
            raise TransientError(f"{what}: {getattr(e, 'reason', e)}") from None
        if flavor != "Google":  # not the metadata server (a proxy or a captive portal answered)
            raise StoreError(f"{what}: the answer lacks Metadata-Flavor: Google")
        if len(raw) > MAX_TOKEN_DOC:
            raise StoreError(f"{what}: answer larger than {MAX_TOKEN_DOC} bytes")
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise StoreError(f"{what}: not a JSON token document") from None
        if not isinstance(doc, dict):
            raise StoreError(f"{what}: not a JSON token document")
        token, ttl, kind = doc.get("access_token"), doc.get("expires_in"), doc.get("token_type")
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN or not _TOKEN_OK.match(token):
            raise StoreError(f"{what}: no usable access_token")  # never quoted: it is a secret
        if not isinstance(kind, str) or kind.lower() != "bearer":
            raise StoreError(f"{what}: token_type {str(kind)[:20]!r} is not Bearer")
        if type(ttl) is not int or not 1 <= ttl <= 86400:
            raise StoreError(f"{what}: expires_in {json.dumps(ttl)[:20]} is not 1 .. 86400 seconds")
        return token, float(ttl)

    def add_header(self, request: Any, **_: Any) -> None:
        request.headers["Authorization"] = f"Bearer {self.get()}"


class GCSBackend(S3Backend):
    def __init__(self, bucket: str, prefix: str, query: dict[str, str], url: str) -> None:
        unknown = set(query) - OPTIONS
        if unknown:
            raise StoreError(
                f"gs URL: unknown option(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(OPTIONS))})"
            )
        check_bucket_name(bucket)
        if ".." in prefix.split("/"):
            raise StoreError("gs URL: '..' is not allowed in the prefix")
        query = {**query, "endpoint": check_endpoint(query.get("endpoint", DEFAULT_ENDPOINT)), "region": REGION}
        auth = query.get("auth", "hmac")
        self.token: MetadataToken | None = None
        if auth == "metadata":
            if "hmac_key_id" in query or "hmac_secret_file" in query:
                raise StoreError("gs: auth=metadata and an HMAC key exclude each other ([gcs] in the node config)")
            self.token = MetadataToken(os.environ.get(METADATA_HOST_ENV) or METADATA_HOST)
            self._key_id, self._secret, self.credential_source = "", "", f"metadata server {self.token.url}"
        elif auth == "hmac":
            self._key_id, self._secret, self.credential_source = hmac_credentials(query)
        else:
            raise StoreError(f"gs: auth={auth[:20]!r} is not hmac or metadata")
        super().__init__(bucket, prefix, query, url)
        self._secret = ""  # the client holds it now
        self.s3.meta.events.register("before-sign.s3.PutObject", _generation_precondition)
        if self.token is not None:
            self.s3.meta.events.register("before-sign.s3", self.token.add_header)

    def _make_client(self, query: dict[str, str], cfg: Config) -> Any:
        only_required = Config(
            request_checksum_calculation="when_required", response_checksum_validation="when_required"
        )
        cfg = cfg.merge(only_required)
        if self.token is not None:  # the bearer header replaces the signature (added before each send)
            cfg = cfg.merge(Config(signature_version=UNSIGNED))
            return boto3.session.Session().client("s3", endpoint_url=query["endpoint"], region_name=REGION, config=cfg)
        # A session of its own with the credentials given: botocore's chain (AWS_* variables, ~/.aws,
        # instance roles) is never consulted.
        session = boto3.session.Session(aws_access_key_id=self._key_id, aws_secret_access_key=self._secret)
        return session.client("s3", endpoint_url=query["endpoint"], region_name=REGION, config=cfg)
