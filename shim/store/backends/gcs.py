"""gs:// backend: Google Cloud Storage through its XML API, which speaks the S3 protocol with HMAC keys.

gs://BUCKET/PREFIX[?endpoint=URL][&multipart_mb=N][&pack_mb=N][&packs=0]

Everything but the points below is the S3 backend (s3.py): the same objects, packs, manifests, locks
and owner epochs, with the same retry and error handling.
- Endpoint https://storage.googleapis.com, SigV4 with region "auto", path-style requests (a dotted
  bucket name would not match the wildcard certificate of a virtual-hosted name).
- Credentials: an HMAC key only, never the AWS chain (no AWS_* variables, ~/.aws or instance roles: an
  AWS key must not be offered to another service). First `hmac_key_id=` + `hmac_secret_file=` (the node
  config's [gcs] section adds them to gs:// URLs, as [registry] adds auth_file; an annotation URL may
  not), else GS_ACCESS_KEY_ID + GS_SECRET_ACCESS_KEY from the environment (the names gsutil's boto
  used). The secret file is a regular file of this user's that no group or other may read.
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
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config

from ..errors import StoreError
from .s3 import S3Backend

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://storage.googleapis.com"
REGION = "auto"  # what GCS expects in the SigV4 credential scope
ENV_KEY_ID = "GS_ACCESS_KEY_ID"
ENV_SECRET = "GS_SECRET_ACCESS_KEY"
# The options a gs:// URL may carry (key_file and allow_plaintext are read by shim.store.open_store).
OPTIONS = frozenset(
    {"endpoint", "multipart_mb", "pack_mb", "packs", "hmac_key_id", "hmac_secret_file", "key_file", "allow_plaintext"}
)
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
    if ep.scheme == "http" and not _loopback(host):
        raise StoreError(f"gs endpoint {endpoint!r}: plain http only to a loopback address; use https")
    return endpoint.rstrip("/")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_secret_file(path: Path) -> str:
    """The HMAC secret: a regular file owned by this user, closed to group and others, one line of text."""
    if not path.is_absolute():
        raise StoreError(f"gs HMAC secret file {str(path)!r} must be an absolute path")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise StoreError(f"gs HMAC secret file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"gs HMAC secret file {path}: not a regular file")
        if st.st_mode & 0o077:
            raise StoreError(
                f"gs HMAC secret file {path}: mode {stat.S_IMODE(st.st_mode):04o} lets group or others in; chmod 600 it"
            )
        if st.st_uid != os.geteuid():
            raise StoreError(f"gs HMAC secret file {path}: owned by uid {st.st_uid}, not by this user ({os.geteuid()})")
        raw = os.read(fd, MAX_SECRET_FILE + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_SECRET_FILE:
        raise StoreError(f"gs HMAC secret file {path}: larger than {MAX_SECRET_FILE} bytes, refused")
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
        self._key_id, self._secret, self.credential_source = hmac_credentials(query)
        super().__init__(bucket, prefix, query, url)
        self._secret = ""  # the client holds it now
        self.s3.meta.events.register("before-sign.s3.PutObject", _generation_precondition)

    def _make_client(self, query: dict[str, str], cfg: Config) -> Any:
        only_required = Config(
            request_checksum_calculation="when_required", response_checksum_validation="when_required"
        )
        cfg = cfg.merge(only_required)
        # A session of its own with the credentials given: botocore's chain (AWS_* variables, ~/.aws,
        # instance roles) is never consulted.
        session = boto3.session.Session(aws_access_key_id=self._key_id, aws_secret_access_key=self._secret)
        return session.client("s3", endpoint_url=query["endpoint"], region_name=REGION, config=cfg)
