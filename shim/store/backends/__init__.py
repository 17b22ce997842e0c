"""Backends chosen by URL scheme: file://, s3://, az://, gs://, oci://."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from ..errors import StoreError
from .base import Backend


def open_backend(url: str) -> Backend:
    u = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(u.query).items()}
    if u.scheme == "file":
        if u.netloc not in ("", "localhost"):
            raise StoreError(f"file URL must be file:///absolute/path, got {url!r}")
        from .local import LocalBackend

        return LocalBackend(Path(u.path), url, packs=query.get("packs", "1") not in ("0", "false", "no"))
    if u.scheme == "s3":
        from .s3 import S3Backend

        return S3Backend(bucket=u.netloc, prefix=u.path.strip("/"), query=query, url=url)
    if u.scheme == "gs":
        from .gcs import GCSBackend

        return GCSBackend(bucket=u.netloc, prefix=u.path.strip("/"), query=query, url=url)
    if u.scheme == "az":
        from .azure import AzureBackend

        return AzureBackend(account=u.netloc, path=u.path, query=query, url=url)
    if u.scheme == "oci":
        from .oci import OCIBackend

        return OCIBackend(host=u.netloc, repo=u.path.strip("/"), query=query, url=url)
    raise StoreError(f"unsupported store URL {url!r} (use file://, s3://, az://, gs:// or oci://)")


__all__ = ["Backend", "open_backend"]
