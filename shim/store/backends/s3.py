"""s3:// backend (boto3): s3://bucket/prefix?endpoint=http://host:port[&region=..][&multipart_mb=N]
[&pack_mb=N][&packs=0].

Credentials come the standard boto3 way (environment, ~/.aws, instance role). Objects larger than
multipart_mb (default 8) go up as multipart uploads. Chunks go into packs of pack_mb MiB (default 16,
shim.store.backends.packs: packs/, index/); `packs=0` stores one object per chunk (chunks/<d[:2]>/<digest>), which
a packed store also reads. Manifests: manifests/<encoded key>/<seq>-<nonce>; locks: locks/<name>. That layout,
lock ages and owner epochs are ObjectBackend's (shim.store.backends.objects, shared with az://); this module
supplies the S3 object operations.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable, Iterator
from email.utils import parsedate_to_datetime
from typing import Any

import boto3
import botocore.exceptions as bex
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from ..errors import StoreError
from .base import Damaged, NotFound, TooLarge, TransientError
from .objects import Listed, ObjectBackend
from .packs import PackStore, pack_mb, packs_enabled
from .redact import RedactSecrets, install

log = logging.getLogger(__name__)


# Network trouble worth retrying. Any other botocore error (no credentials, bad config, a parameter
# botocore refuses) fails the same way every time: it is reported at once, not retried.
_TRANSIENT = (
    bex.EndpointConnectionError,
    bex.ConnectionClosedError,
    bex.ReadTimeoutError,
    bex.ConnectTimeoutError,
    bex.ResponseStreamingError,
    bex.HTTPClientError,
    bex.IncompleteReadError,
)
_CREDENTIALS = (
    bex.NoCredentialsError,
    bex.PartialCredentialsError,
    bex.CredentialRetrievalError,
    bex.NoAuthTokenError,
)
# Header values (quoted, as in a logged dict) and signature parameters (headers, query strings, the
# signing steps botocore.auth logs as "Signature:\n<hex>").
_REDACT = (
    re.compile(r"""(['"](?:Authorization|X-Amz-Security-Token)['"]\s*:\s*b?['"])[^'"]*""", re.IGNORECASE),
    re.compile(r"""((?:X-Amz-Signature|Signature|X-Amz-Security-Token|X-Amz-Credential)\s*[:=]\s*)[^\s'",&}]+"""),
)


# botocore's debug log prints request headers (the Authorization signature, session tokens) and the signing steps.
_REDACTOR = RedactSecrets(_REDACT)
# Loggers that print headers, signatures or the strings signed (botocore logs through module loggers;
# a filter on "botocore" alone would not see their records).
_NOISY_LOGGERS = (
    "botocore",
    "botocore.endpoint",
    "botocore.auth",
    "botocore.awsrequest",
    "botocore.httpsession",
    "botocore.hooks",
    "botocore.parsers",
    "botocore.retryhandler",
    "botocore.credentials",
    "botocore.client",
    "botocore.regions",
    "botocore.utils",
    "s3transfer",
    "urllib3.connectionpool",
)


def _install_redaction() -> None:
    names = set(_NOISY_LOGGERS) | {
        n for n in logging.root.manager.loggerDict if n.startswith(("botocore", "boto3", "s3transfer"))
    }
    install(_REDACTOR, names)


def _classify(e: Exception, what: str) -> Exception:
    if isinstance(e, _CREDENTIALS):
        return StoreError(f"{what}: no usable S3 credentials ({e}); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    if isinstance(e, _TRANSIENT):
        return TransientError(f"{what}: {e}")
    if isinstance(e, bex.ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in ("NoSuchKey", "404", "NotFound"):
            return NotFound(f"{what}: not found")
        if code == "InvalidRange" or status == 416:
            return Damaged(f"{what}: the object is shorter than the range asked for")
        if status >= 500 or code in ("SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable"):
            return TransientError(f"{what}: {code} ({status})")
        return StoreError(f"{what}: {code}: {e}")
    if isinstance(e, bex.BotoCoreError):
        return StoreError(f"{what}: {e}")
    return e


class S3Backend(ObjectBackend):
    def __init__(self, bucket: str, prefix: str, query: dict[str, str], url: str) -> None:
        if not bucket:
            raise StoreError(f"s3 URL needs a bucket: {url!r}")
        self.url = url
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.multipart = int(float(query.get("multipart_mb", "8")) * (1 << 20))
        cfg = Config(
            retries={"max_attempts": 2, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            s3={"addressing_style": "path"},
            max_pool_connections=32,
        )
        self.s3 = self._make_client(query, cfg)
        self._conditional: bool | None = None  # server honours If-None-Match (probed on first claim)
        _install_redaction()  # after the client exists: its modules' loggers are registered by then
        self.transfer = TransferConfig(
            multipart_threshold=self.multipart, multipart_chunksize=self.multipart, max_concurrency=4
        )
        self.packs = PackStore(self, pack_mb(query)) if packs_enabled(query) else None

    def _make_client(self, query: dict[str, str], cfg: Config) -> Any:
        """The botocore S3 client; a backend for another S3-compatible service (gcs.py) overrides it."""
        return boto3.session.Session().client(
            "s3", endpoint_url=query.get("endpoint"), region_name=query.get("region", "us-east-1"), config=cfg
        )

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except Exception as e:
            raise _classify(e, what) from e

    def _put(self, name: str, data: bytes | bytearray) -> None:
        key = self.prefix + name
        if len(data) >= self.multipart:
            self._call(
                f"upload {key}", self.s3.upload_fileobj, io.BytesIO(data), self.bucket, key, Config=self.transfer
            )
        else:
            self._call(f"put {key}", self.s3.put_object, Bucket=self.bucket, Key=key, Body=data)

    def _get(self, name: str, limit: int) -> bytes:
        """The object's bytes; TooLarge (without reading it) when it is over limit."""
        key = self.prefix + name
        resp = self._call(f"get {key}", self.s3.get_object, Bucket=self.bucket, Key=key)
        body = resp["Body"]
        try:
            length = resp.get("ContentLength")
            if type(length) is not int or length > limit:
                raise TooLarge(f"{key} is {length} bytes, over the {limit}-byte limit")
            data: bytes = self._call(f"read {key}", body.read, limit + 1)
            if len(data) > limit:
                raise TooLarge(f"{key} sent more than {limit} bytes")
            if len(data) < length:  # the server promised more: the connection was cut, not the object
                raise TransientError(f"get {key}: read {len(data)} of {length} bytes")
            return data
        finally:
            body.close()

    def _exists(self, name: str) -> bool:
        try:
            self._call(f"head {name}", self.s3.head_object, Bucket=self.bucket, Key=self.prefix + name)
            return True
        except NotFound:
            return False

    def _delete(self, name: str) -> None:
        self._call(f"delete {name}", self.s3.delete_object, Bucket=self.bucket, Key=self.prefix + name)

    def _list(self, sub: str) -> Iterator[dict[str, Any]]:
        paginator = self.s3.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + sub)
        try:
            for page in pages:
                yield from page.get("Contents", [])
        except Exception as e:
            raise _classify(e, f"list {sub}") from e

    # plain objects, for the pack layer (shim.store.backends.packs.ObjectStore)
    def put_object(self, name: str, data: bytes | bytearray) -> None:
        self._put(name, data)

    def get_object(self, name: str, limit: int) -> bytes:
        return self._get(name, limit)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        key = self.prefix + name
        what = f"get {key} bytes {offset}+{length}"
        resp = self._call(
            what, self.s3.get_object, Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}"
        )
        body = resp["Body"]
        try:
            if resp.get("ContentLength") != length:
                raise Damaged(f"{what}: the server answered {resp.get('ContentLength')} bytes (object too short?)")
            data: bytes = self._call(f"read {key}", body.read, length + 1)
        finally:
            body.close()
        if len(data) < length:  # the server promised length bytes: the connection was cut, not the object
            raise TransientError(f"{what}: read {len(data)} bytes")
        if len(data) != length:
            raise Damaged(f"{what}: read {len(data)} bytes")
        return data

    def object_exists(self, name: str) -> bool:
        return self._exists(name)

    def delete_object(self, name: str) -> None:
        self._delete(name)

    # owner epochs (ObjectBackend.create_epoch)
    def put_if_absent(self, name: str, data: bytes) -> bool:
        """PUT with If-None-Match: *; False when the object exists (412)."""
        key = self.prefix + name
        try:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except bex.ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                return False
            raise _classify(e, f"create {key}") from e
        except Exception as e:
            raise _classify(e, f"create {key}") from e

    def list_pages(self, sub: str) -> Iterator[tuple[list[Listed], float | None]]:
        token: dict[str, str] = {}
        while True:
            page = self._call(
                f"list {sub}", self.s3.list_objects_v2, Bucket=self.bucket, Prefix=self.prefix + sub, **token
            )
            date = page.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
            now = parsedate_to_datetime(date).timestamp() if date else None
            objs = [
                Listed(o["Key"][len(self.prefix) :], o.get("Size", 0), o["LastModified"].timestamp(), o.get("ETag", ""))
                for o in page.get("Contents", [])
            ]
            yield objs, now
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def close(self) -> None:
        super().close()
        self.s3.close()
