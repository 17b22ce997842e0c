"""Choose the notice watcher: by name, or by probing each provider's metadata service."""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable, Mapping

from shim.agent import aws, azure, gcp
from shim.agent.notice import Watcher

log = logging.getLogger(__name__)

PROVIDERS = ("aws", "gcp", "azure")
DEFAULT_URLS: dict[str, str] = {
    "aws": aws.DEFAULT_BASE_URL,
    "gcp": gcp.DEFAULT_BASE_URL,
    "azure": azure.DEFAULT_BASE_URL,
}
_PROBES: dict[str, Callable[[str, float], bool]] = {"aws": aws.probe, "gcp": gcp.probe, "azure": azure.probe}


def parse_metadata_urls(values: list[str] | None) -> dict[str, str]:
    """`--metadata-url` values: "URL" (every provider) or "aws=URL" / "gcp=URL" / "azure=URL"."""
    urls: dict[str, str] = {}
    for value in values or []:
        name, sep, url = value.partition("=")
        if sep and name in PROVIDERS:
            urls[name] = url
        elif "://" in value and not (sep and name.isidentifier()):  # "oracle=http://..." is a typo, not a URL
            urls.update(dict.fromkeys(PROVIDERS, value))
        else:
            raise ValueError(f"--metadata-url {value!r}: expected URL or PROVIDER=URL with PROVIDER in {PROVIDERS}")
    return urls


def base_url(provider: str, urls: Mapping[str, str]) -> str:
    return urls.get(provider) or DEFAULT_URLS[provider]


def detect(urls: Mapping[str, str], timeout: float = 1.0) -> str | None:
    """The first provider (in PROVIDERS order) whose metadata service answers its probe, else None.

    Probes run at once: off-cloud each one costs a connect timeout or a slow DNS lookup.
    """
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(PROVIDERS), thread_name_prefix="probe")
    try:
        futures = {name: pool.submit(_PROBES[name], base_url(name, urls), timeout) for name in PROVIDERS}
        # A DNS lookup ignores the socket timeout: bound the whole detection instead.
        concurrent.futures.wait(futures.values(), timeout=timeout + 2.0)
        for name in PROVIDERS:
            fut = futures[name]
            ok = fut.done() and not fut.exception() and fut.result()
            log.debug("probe %s at %s: %s", name, base_url(name, urls), "yes" if ok else "no")
            if ok:
                return name
        return None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def make_watcher(provider: str, urls: Mapping[str, str], **options: object) -> Watcher | None:
    """The watcher for `provider` ("auto" probes; "none" or nothing found: None)."""
    if provider == "auto":
        found = detect(urls)
        if found is None:
            log.warning(
                "no cloud metadata service answered (tried %s); not watching for notices",
                ", ".join(f"{p} at {base_url(p, urls)}" for p in PROVIDERS),
            )
            return None
        log.info("detected %s metadata service at %s", found, base_url(found, urls))
        provider = found
    if provider == "none":
        return None
    url = base_url(provider, urls)
    if provider == "aws":
        return aws.AwsWatcher(url, **options)  # type: ignore[arg-type]
    if provider == "gcp":
        return gcp.GcpWatcher(url, **options)  # type: ignore[arg-type]
    if provider == "azure":
        return azure.AzureWatcher(url, **options)  # type: ignore[arg-type]
    raise ValueError(f"unknown provider {provider!r}; expected auto, none or one of {PROVIDERS}")
