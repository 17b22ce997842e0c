"""Provider auto-detection: each probe must recognise only its own cloud's metadata service."""

from __future__ import annotations

import socket

import pytest

from shim.agent.aws import AwsWatcher
from shim.agent.azure import AzureWatcher
from shim.agent.detect import detect, make_watcher, parse_metadata_urls
from shim.agent.gcp import GcpWatcher


@pytest.mark.parametrize("provider", ["aws", "gcp", "azure"])
def test_detects_the_one_provider_served(metadata_server, provider: str) -> None:
    srv = metadata_server((provider,))
    assert detect(parse_metadata_urls([srv.url])) == provider


def test_nothing_listening_detects_none() -> None:
    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert detect(parse_metadata_urls([url]), timeout=0.5) is None
    assert make_watcher("auto", parse_metadata_urls([url])) is None


def test_a_server_that_is_no_metadata_service_detects_none(metadata_server) -> None:
    srv = metadata_server(())  # answers 404 everywhere
    assert detect(parse_metadata_urls([srv.url])) is None


def test_per_provider_urls_and_explicit_choice(metadata_server) -> None:
    aws_srv, gcp_srv = metadata_server(("aws",)), metadata_server(("gcp",))
    urls = parse_metadata_urls([f"aws={aws_srv.url}", f"gcp={gcp_srv.url}"])
    assert urls == {"aws": aws_srv.url, "gcp": gcp_srv.url}
    assert isinstance(make_watcher("gcp", urls), GcpWatcher)
    w = make_watcher("aws", urls)
    assert isinstance(w, AwsWatcher) and w.base_url == aws_srv.url
    assert isinstance(make_watcher("azure", urls), AzureWatcher)
    assert make_watcher("none", urls) is None
    assert isinstance(make_watcher("auto", urls), AwsWatcher)  # first in probe order that answers


def test_bad_metadata_url_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_metadata_urls(["oracle=http://x"])
