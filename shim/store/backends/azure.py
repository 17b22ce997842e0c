"""az:// backend (Azure Blob Storage, azure-storage-blob): az://ACCOUNT/CONTAINER[/PREFIX]
[?endpoint=http://127.0.0.1:PORT/ACCOUNT][&block_mb=N][&pack_mb=N][&packs=0][&credentials_file=PATH].

The container must exist. Objects are block blobs; one larger than block_mb (default 8) goes up as blocks
staged in parallel and committed at once (the SDK's stage_block/commit_block_list), so readers see the whole
blob or the previous one. Layout and semantics are ObjectBackend's (shim.store.backends.objects); owner
epochs are create-only puts (If-None-Match: *), lock ages are Last-Modified against the listing's Date.

Credentials, never from the URL's own text: the node's `[azure] credentials_file` (a connection string:
AccountName=..;AccountKey=.. or ..;SharedAccessSignature=..; the node config adds it to az:// URLs as
`credentials_file=`), else the AZURE_STORAGE_CONNECTION_STRING environment variable, else
DefaultAzureCredential when the optional azure-identity package is installed (managed identity, workload
identity, az login). `endpoint=` points the client at another service (Azurite); plain http only to loopback.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from collections.abc import Callable, Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from azure.core import exceptions as aex
from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential
from azure.storage.blob import BlobServiceClient, LinearRetry

from shim.hosts import is_loopback

from ..errors import StoreError
from ..private_file import read_private_file
from .base import Damaged, NotFound, TooLarge, TransientError
from .objects import Listed, ObjectBackend
from .packs import PackStore, pack_mb, packs_enabled
from .redact import RedactSecrets, install

log = logging.getLogger(__name__)

ACCOUNT_OK = re.compile(r"^[a-z0-9]{3,24}$")
# 3-63 lower-case letters, digits and single hyphens, starting and ending with a letter or digit.
CONTAINER_OK = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(?:-[a-z0-9]+)*$")
PREFIX_OK = re.compile(r"^(?!.*(?:^|/)\.{1,2}(?:/|$))[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*$")
MAX_PREFIX = 512
MAX_BLOCK_MB = 100
DEFAULT_BLOCK_MB = 8
CONNECTION_STRING_ENV = "AZURE_STORAGE_CONNECTION_STRING"
MAX_CREDENTIALS_FILE = 64 << 10
GET_PIECE = 4 << 20  # the first GET of a download (and each later piece): bounds what a TooLarge check reads
CONCURRENCY = 4

# azure-core logs every request and response at INFO (redacted, but one line per request); warnings stay.
_NOISY_LOGGERS = ("azure.core.pipeline.policies.http_logging_policy", "azure.storage")
# What a debug log must never show: a SAS signature (urllib3 logs every request URL at DEBUG), a Shared Key
# Authorization value, a connection string's key or token.
_REDACT = (
    re.compile(r"""(\bsig=)[^&\s'"]+"""),
    re.compile(r"""(SharedKey\s+[^:\s'"]+:)[^\s'"]+"""),
    re.compile(r"""((?:AccountKey|SharedAccessSignature)=)[^;\s'"]+"""),
)
# Loggers that print request URLs or headers (a filter acts only on records logged to its own logger).
_URL_LOGGERS = (
    "urllib3.connectionpool",
    "azure",
    "azure.core.pipeline.policies.http_logging_policy",
    "azure.core.pipeline.transport._requests_basic",
    "azure.storage.blob._shared.policies",
    "azure.storage.blob._shared.response_handlers",
)


_REDACTOR = RedactSecrets(_REDACT)


def _install_redaction() -> None:
    names = set(_URL_LOGGERS) | {n for n in logging.root.manager.loggerDict if n.startswith("azure")}
    install(_REDACTOR, names)


def check_endpoint(endpoint: str, account: str, what: str) -> str:
    """http(s)://HOST[:PORT][/ACCOUNT] (the account path segment for an emulator such as Azurite); plain
    http only to a loopback host (an account key or SAS must not cross a network in the clear)."""
    ep = urlsplit(endpoint)
    path = ep.path.strip("/")
    if ep.scheme not in ("http", "https") or not ep.hostname or ep.query or ep.fragment or "@" in ep.netloc:
        raise StoreError(f"{what}: endpoint must be http(s)://HOST[:PORT][/ACCOUNT], got {endpoint!r}")
    if path not in ("", account):
        raise StoreError(f"{what}: endpoint path {ep.path!r} must be empty or /{account} (the URL's account)")
    if ep.scheme == "http" and not is_loopback(ep.hostname):
        raise StoreError(f"{what}: plain http is allowed only to a loopback endpoint, got {endpoint!r}")
    return endpoint.rstrip("/")


def parse_az_url(netloc: str, path: str, query: dict[str, str], url: str) -> tuple[str, str, str]:
    """(account, container, prefix) of az://ACCOUNT/CONTAINER[/PREFIX], each checked against Azure's rules."""
    account = netloc
    container, _, prefix = path.strip("/").partition("/")
    if not ACCOUNT_OK.match(account):
        raise StoreError(f"{url!r}: {account!r} is not an Azure storage account name (3-24 lower-case letters, digits)")
    if not CONTAINER_OK.match(container):
        raise StoreError(
            f"{url!r}: {container!r} is not an Azure container name (3-63 lower-case letters, digits, single '-')"
        )
    prefix = prefix.strip("/")
    if prefix and (len(prefix) > MAX_PREFIX or not PREFIX_OK.match(prefix)):
        raise StoreError(f"{url!r}: the prefix {prefix!r} must be path segments of letters, digits, '.', '_', '-'")
    unknown = set(query) - {"endpoint", "block_mb", "pack_mb", "packs", "credentials_file", "key_file"}
    unknown -= {"allow_plaintext"}
    if unknown:
        raise StoreError(f"{url!r}: unknown option(s) {', '.join(sorted(unknown))} for az://")
    return account, container, prefix


def block_mb(query: dict[str, str]) -> int:
    raw = query.get("block_mb", str(DEFAULT_BLOCK_MB))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_BLOCK_MB:
        raise StoreError(f"block_mb must be a whole number of MiB between 1 and {MAX_BLOCK_MB}, got {raw!r}")
    return int(raw)


def parse_connection_string(text: str, where: str) -> dict[str, str]:
    """Key=Value;Key=Value (values may hold '=': base64 keys, SAS tokens)."""
    out: dict[str, str] = {}
    for part in text.strip().split(";"):
        if not part.strip():
            continue
        k, eq, v = part.strip().partition("=")
        if not eq or not k:
            raise StoreError(f"{where}: not an Azure connection string (expected Key=Value;...)")
        out[k] = v
    return out


def read_credentials_file(path: str) -> str:
    """The node's connection string (it may hold the account key): a regular file owned by this user,
    closed to group and others."""
    raw = read_private_file(Path(path), "Azure credentials file", MAX_CREDENTIALS_FILE, absolute=True)
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise StoreError(f"Azure credentials file {path} is not text") from None


def credential_for(account: str, query: dict[str, str], url: str) -> tuple[Any, str | None]:
    """(credential, endpoint from the credentials) from the node's file, the environment, or azure-identity."""
    text, where = None, ""
    if query.get("credentials_file"):
        text, where = read_credentials_file(query["credentials_file"]), query["credentials_file"]
    elif os.environ.get(CONNECTION_STRING_ENV):
        text, where = os.environ[CONNECTION_STRING_ENV], CONNECTION_STRING_ENV
    if text is not None:
        cs = parse_connection_string(text, where)
        named = cs.get("AccountName")
        if named is not None and named != account:
            raise StoreError(f"{url}: the credentials in {where} are for account {named!r}, not {account!r}")
        endpoint = cs.get("BlobEndpoint")
        if endpoint is None and cs.get("EndpointSuffix"):
            endpoint = f"https://{account}.blob.{cs['EndpointSuffix']}"
        if cs.get("AccountKey"):
            return AzureNamedKeyCredential(account, cs["AccountKey"]), endpoint
        if cs.get("SharedAccessSignature"):
            return AzureSasCredential(cs["SharedAccessSignature"].lstrip("?")), endpoint
        raise StoreError(f"{url}: {where} has neither AccountKey nor SharedAccessSignature")
    try:
        from azure.identity import DefaultAzureCredential  # optional: pip install azure-identity
    except ImportError:
        raise StoreError(
            f"{url}: no Azure credentials: set {CONNECTION_STRING_ENV}, the node's [azure] credentials_file, "
            "or install azure-identity for managed/workload identity"
        ) from None
    return DefaultAzureCredential(), None


def _classify(e: Exception, what: str, container: str) -> Exception:
    if isinstance(e, aex.ClientAuthenticationError):
        return StoreError(f"{what}: Azure refused the credentials ({_code(e)}); check the account key or SAS token")
    if isinstance(e, aex.ResourceNotFoundError | aex.HttpResponseError) and _code(e) == "ContainerNotFound":
        return StoreError(f"{what}: the container {container!r} does not exist (create it first)")
    if isinstance(e, aex.ResourceNotFoundError):
        return NotFound(f"{what}: not found")
    if isinstance(e, aex.ServiceRequestError | aex.ServiceResponseError | aex.IncompleteReadError):
        return TransientError(f"{what}: {type(e).__name__}: {str(e)[:300]}")
    if isinstance(e, aex.HttpResponseError):
        status = e.status_code or 0
        if status == 404:
            return NotFound(f"{what}: not found")
        if status == 416:
            return Damaged(f"{what}: the object is shorter than the range asked for")
        if status in (408, 429) or status >= 500:
            return TransientError(f"{what}: {_code(e)} ({status})")
        if status in (401, 403):
            return StoreError(f"{what}: Azure refused the credentials ({_code(e)}, {status}); check the key or SAS")
        return StoreError(f"{what}: {_code(e)} ({status})")
    if isinstance(e, aex.AzureError):
        return StoreError(f"{what}: {type(e).__name__}: {str(e)[:300]}")
    return e


def _code(e: Exception) -> str:
    code = getattr(e, "error_code", None) or getattr(e, "reason", None) or type(e).__name__
    return str(getattr(code, "value", code))  # StorageErrorCode members print as their wire names


class AzureBackend(ObjectBackend):
    def __init__(self, account: str, path: str, query: dict[str, str], url: str) -> None:
        self.url = url
        account, container, prefix = parse_az_url(account, path, query, url)
        self.account, self.container_name = account, container
        self.prefix = f"{prefix}/" if prefix else ""
        self.block = block_mb(query) << 20
        if query.get("endpoint"):  # checked before any credential is looked up
            check_endpoint(query["endpoint"], account, url)
        credential, cred_endpoint = credential_for(account, query, url)
        endpoint = query.get("endpoint") or cred_endpoint or f"https://{account}.blob.core.windows.net"
        endpoint = check_endpoint(endpoint, account, url)
        for name in _NOISY_LOGGERS:
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        self.service = BlobServiceClient(
            endpoint,
            credential=credential,
            max_single_put_size=self.block,
            max_block_size=self.block,
            max_single_get_size=GET_PIECE,
            max_chunk_get_size=GET_PIECE,
            connection_timeout=5,
            read_timeout=60,
            # One quick retry inside the SDK (its default waits 15 s and more); Backend.retry does the rest.
            # (typed int, used as float seconds by time.sleep)
            retry_policy=LinearRetry(backoff=0.5, retry_total=1, random_jitter_range=0.2),  # type: ignore[arg-type]
        )
        self.container = self.service.get_container_client(container)
        _install_redaction()  # after the client exists: the SDK's modules' loggers are registered by then
        self._conditional = None
        self.packs = PackStore(self, pack_mb(query)) if packs_enabled(query) else None

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except Exception as e:
            raise _classify(e, what, self.container_name) from e

    def _blob(self, name: str) -> Any:
        return self.container.get_blob_client(self.prefix + name)

    # plain objects (ObjectBackend, and the pack layer's ObjectStore)
    def put_object(self, name: str, data: bytes | bytearray) -> None:
        body = data if isinstance(data, bytes) else io.BytesIO(data)
        self._call(
            f"put {name}",
            self._blob(name).upload_blob,
            body,
            length=len(data),
            overwrite=True,
            max_concurrency=CONCURRENCY,
        )

    def get_object(self, name: str, limit: int) -> bytes:
        what = f"get {name}"

        def read() -> bytes:
            dl = self._blob(name).download_blob(max_concurrency=CONCURRENCY)  # the first piece only, so far
            size = dl.properties.size
            if type(size) is not int or size > limit:
                raise TooLarge(f"{self.prefix}{name} is {size} bytes, over the {limit}-byte limit")
            data: bytes = dl.readall()
            if len(data) != size:
                raise TransientError(f"{what}: read {len(data)} of {size} bytes")
            return data

        return self._call(what, read)  # type: ignore[no-any-return]

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        what = f"get {name} bytes {offset}+{length}"

        def read() -> bytes:
            dl = self._blob(name).download_blob(offset=offset, length=length, max_concurrency=CONCURRENCY)
            data: bytes = dl.readall()
            return data

        data = self._call(what, read)
        if len(data) != length:
            raise Damaged(f"{what}: read {len(data)} bytes (object too short?)")
        return data  # type: ignore[no-any-return]

    def object_exists(self, name: str) -> bool:
        try:
            self._call(f"head {name}", self._blob(name).get_blob_properties)
            return True
        except NotFound:
            return False

    def delete_object(self, name: str) -> None:
        with contextlib.suppress(NotFound):  # deleting what is gone is no error (as on S3)
            self._call(f"delete {name}", self._blob(name).delete_blob)

    def list_pages(self, sub: str) -> Iterator[tuple[list[Listed], float | None]]:
        dates: list[str | None] = []

        def hook(response: Any) -> None:
            dates.append(response.http_response.headers.get("Date"))

        pages = self._call(
            f"list {sub}", self.container.list_blobs, name_starts_with=self.prefix + sub, raw_response_hook=hook
        ).by_page()
        while True:
            try:
                page = next(pages)
                blobs = list(page)
            except StopIteration:
                return
            except Exception as e:
                raise _classify(e, f"list {sub}", self.container_name) from e
            date = dates[-1] if dates else None
            now = parsedate_to_datetime(date).timestamp() if date else None
            yield (
                [
                    Listed(b.name[len(self.prefix) :], int(b.size or 0), b.last_modified.timestamp(), str(b.etag))
                    for b in blobs
                    if b.name.startswith(self.prefix)
                ],
                now,
            )

    def put_if_absent(self, name: str, data: bytes) -> bool:
        """upload_blob without overwrite sends If-None-Match: *; an existing blob answers 409/412."""
        what = f"create {name}"
        try:
            self._blob(name).upload_blob(data, length=len(data), overwrite=False)
            return True
        except aex.ResourceExistsError:
            return False
        except aex.HttpResponseError as e:
            if e.status_code in (409, 412) and _code(e) != "ContainerNotFound":
                return False
            raise _classify(e, what, self.container_name) from e
        except Exception as e:
            raise _classify(e, what, self.container_name) from e

    def close(self) -> None:
        super().close()
        self.service.close()


__all__ = ["AzureBackend", "check_endpoint", "parse_az_url"]
