"""oci:// stores on registries that ask for credentials: the real docker-registry with `auth: htpasswd:`
(Basic) and with `auth: token:` (the Docker token flow, against a token issuer on 127.0.0.1 that stands
in for GHCR's auth server: tests/harness/token_issuer.py). Credentials come from a Docker config file
(DOCKER_CONFIG) or the node's `[registry] auth_file`."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import bcrypt
import pytest

from harness.servers import Registry
from harness.store_util import make_tree, tree_digest
from harness.token_issuer import SERVICE, TokenIssuer
from shim.protect.policy import NodeConfig
from shim.store import StoreError, open_store
from shim.store.backends.oci import OCIBackend

KEY = "default/authpod/main"
USER, PASSWORD = "alice", "alice-secret"


def _auth(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    root = tmp_path_factory.mktemp("registry-basic")
    htpasswd = root / "htpasswd"
    htpasswd.write_text(f"{USER}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=5)).decode()}\n")
    srv = Registry(root, auth=f"  htpasswd:\n    realm: revenant-test\n    path: {htpasswd}\n")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenIssuer]:
    iss = TokenIssuer(tmp_path_factory.mktemp("token-issuer"))
    try:
        yield iss
    finally:
        iss.stop()


@pytest.fixture(scope="module")
def token_registry(issuer: TokenIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    srv = Registry(tmp_path_factory.mktemp("registry-token"), auth=issuer.registry_auth())
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(autouse=True)
def docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty DOCKER_CONFIG of the test's own (never the user's ~/.docker)."""
    d = tmp_path / "docker"
    d.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(d))
    return d / "config.json"


@pytest.fixture
def fresh_issuer(issuer: TokenIssuer) -> Iterator[TokenIssuer]:
    issuer.requests.clear()
    issuer.expires_in, issuer.pull_only = 300, 0
    yield issuer
    issuer.expires_in, issuer.pull_only = 300, 0


def write_config(path: Path, entries: dict[str, dict[str, str]]) -> None:
    path.write_text(json.dumps({"auths": entries}))
    path.chmod(0o600)


def store_url(registry: Registry) -> tuple[str, str]:
    repo = f"revenant-auth-{uuid.uuid4().hex[:12]}"
    return f"oci://127.0.0.1:{registry.port}/{repo}?insecure=1", repo


def round_trip(url: str, tmp_path: Path) -> None:
    """put twice, restore, prune and gc: every kind of request the backend makes (GET, HEAD, POST,
    PATCH, PUT, DELETE) passes the registry's authentication."""
    src = make_tree(tmp_path / "src", seed=7, big_mib=4)
    # Packs of 1 MiB go up several at once, in PATCH pieces (over chunked_mb), and are read back with
    # ranged GETs: every new request type passes the registry's authentication too.
    url += "&chunked_mb=0.5&pack_mb=1"
    with open_store(url) as store:
        store.put(KEY, src)
        (src / "one-byte").write_bytes(b"y")
        second = store.put(KEY, src)
        got = store.get(KEY, tmp_path / "dest")
        assert got.seq == second.seq == 2
        assert tree_digest(tmp_path / "dest") == tree_digest(src)
        with open_store(url) as fresh:  # learns the packs from the pack index, reads them by range
            fresh.get(KEY, tmp_path / "fresh")
        assert tree_digest(tmp_path / "fresh") == tree_digest(src)
        assert store.prune(KEY, keep=1) == [1]
        store.gc(grace_seconds=0)
        assert [c.seq for c in store.list(KEY)] == [2]
        assert store.verify(KEY) == []


# ---------------------------------------------------------------------------------------------- Basic
def test_basic_round_trip_with_docker_config(basic_registry: Registry, docker_config: Path, tmp_path: Path) -> None:
    url, _repo = store_url(basic_registry)
    write_config(docker_config, {f"127.0.0.1:{basic_registry.port}": _auth(USER, PASSWORD)})
    round_trip(url, tmp_path)


def test_basic_username_password_under_an_https_key(
    basic_registry: Registry, docker_config: Path, tmp_path: Path
) -> None:
    url, _repo = store_url(basic_registry)
    write_config(docker_config, {f"https://127.0.0.1:{basic_registry.port}/": {"username": USER, "password": PASSWORD}})
    with open_store(url) as store:
        store.put(KEY, make_tree(tmp_path / "src", seed=3, big_mib=1))
        assert [c.seq for c in store.list(KEY)] == [1]


def test_basic_refused_credentials_fail_clearly_and_lose_nothing(
    basic_registry: Registry, docker_config: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url, _repo = store_url(basic_registry)
    host = f"127.0.0.1:{basic_registry.port}"
    src = make_tree(tmp_path / "src", seed=4, big_mib=1)
    write_config(docker_config, {host: _auth(USER, PASSWORD)})
    with open_store(url) as store:
        store.put(KEY, src)

    caplog.set_level(logging.DEBUG)
    write_config(docker_config, {host: _auth(USER, "wrong-password")})
    with open_store(url) as store, pytest.raises(StoreError, match="authentication failed") as refused:
        store.put(KEY, make_tree(tmp_path / "other", seed=5, big_mib=1))
    assert "refused the credentials" in str(refused.value) and "wrong-password" not in str(refused.value)

    docker_config.unlink()
    with open_store(url) as store, pytest.raises(StoreError, match="authentication failed") as none:
        store.list(KEY)
    assert "none are configured" in str(none.value) and str(docker_config) in str(none.value)
    assert "wrong-password" not in caplog.text and PASSWORD not in caplog.text

    write_config(docker_config, {host: _auth(USER, PASSWORD)})  # the first checkpoint is all there
    with open_store(url) as store:
        assert [c.seq for c in store.list(KEY)] == [1]
        store.get(KEY, tmp_path / "dest")
    assert tree_digest(tmp_path / "dest") == tree_digest(src)


def test_credentials_for_another_host_are_not_used(basic_registry: Registry, docker_config: Path) -> None:
    url, _repo = store_url(basic_registry)
    write_config(docker_config, {"registry.example.com": _auth(USER, PASSWORD), "127.0.0.1": _auth(USER, PASSWORD)})
    with open_store(url) as store, pytest.raises(StoreError, match="none are configured"):
        store.list(KEY)


def test_node_auth_file_opens_stores_from_the_node_config(
    basic_registry: Registry, docker_config: Path, tmp_path: Path
) -> None:
    """`[registry] auth_file` reaches the backend through the store URLs the node config hands out
    (the way shim.protect opens stores), and wins over the Docker config file."""
    url, _repo = store_url(basic_registry)
    secret = tmp_path / "registry-secret.json"
    write_config(secret, {f"127.0.0.1:{basic_registry.port}": {"username": USER, "password": PASSWORD}})
    write_config(docker_config, {f"127.0.0.1:{basic_registry.port}": _auth(USER, "stale-password")})
    node = NodeConfig.from_dict({"store": url, "registry": {"auth_file": str(secret)}}, "test")
    assert node.store == f"{url}&auth_file={secret}"
    with open_store(node.store) as store:
        store.put(KEY, make_tree(tmp_path / "src", seed=6, big_mib=1))
        assert [c.seq for c in store.list(KEY)] == [1]
    secret.unlink()
    with open_store(node.store) as store, pytest.raises(StoreError, match=r"auth_file.*does not exist"):
        store.list(KEY)


# ---------------------------------------------------------------------------------------------- token
def test_token_round_trip_asks_for_the_right_scope(
    token_registry: Registry, fresh_issuer: TokenIssuer, docker_config: Path, tmp_path: Path
) -> None:
    url, repo = store_url(token_registry)
    write_config(docker_config, {f"127.0.0.1:{token_registry.port}": _auth(USER, PASSWORD)})
    round_trip(url, tmp_path)
    assert fresh_issuer.requests, "the registry never sent the client to the token issuer"
    for req in fresh_issuer.requests:
        assert (req.method, req.user, req.grant, req.service) == ("GET", USER, "basic", SERVICE)
        assert req.scopes == [f"repository:{repo}:pull,push,delete"]
    # The token is cached: one for the whole round trip, not one per request (there are hundreds).
    assert len(fresh_issuer.requests) == 1


def test_token_is_shared_by_stores_opened_later(
    token_registry: Registry, fresh_issuer: TokenIssuer, docker_config: Path, tmp_path: Path
) -> None:
    url, _repo = store_url(token_registry)
    write_config(docker_config, {f"127.0.0.1:{token_registry.port}": _auth(USER, PASSWORD)})
    for seed in range(3):  # as the shim does: a store opened per checkpoint
        with open_store(url) as store:
            store.put(KEY, make_tree(tmp_path / f"src{seed}", seed=seed, big_mib=1))
    assert len(fresh_issuer.requests) == 1
    write_config(docker_config, {f"127.0.0.1:{token_registry.port}": {"username": USER, "password": PASSWORD}})
    with open_store(url) as store:  # the same credentials written another way: still the same token
        assert len(store.list(KEY)) == 3
    assert len(fresh_issuer.requests) == 1


def test_token_with_short_expiry_is_renewed(
    token_registry: Registry, fresh_issuer: TokenIssuer, docker_config: Path, tmp_path: Path
) -> None:
    url, _repo = store_url(token_registry)
    write_config(docker_config, {f"127.0.0.1:{token_registry.port}": _auth(USER, PASSWORD)})
    fresh_issuer.expires_in = 2
    with open_store(url) as store:
        store.put(KEY, make_tree(tmp_path / "src", seed=8, big_mib=1))
        first = len(fresh_issuer.requests)
        time.sleep(2.5)  # past expires_in: the next request must not go out with the old token
        assert [c.seq for c in store.list(KEY)] == [1]
    assert first >= 1 and len(fresh_issuer.requests) > first


def test_token_short_of_scope_runs_the_flow_again(
    token_registry: Registry, fresh_issuer: TokenIssuer, docker_config: Path, tmp_path: Path
) -> None:
    """A token the registry refuses later (here: it grants pull only, the push is refused) is replaced."""
    url, _repo = store_url(token_registry)
    write_config(docker_config, {f"127.0.0.1:{token_registry.port}": _auth(USER, PASSWORD)})
    fresh_issuer.pull_only = 1
    with open_store(url) as store:
        store.put(KEY, make_tree(tmp_path / "src", seed=9, big_mib=1))
        assert [c.seq for c in store.list(KEY)] == [1]
    assert len(fresh_issuer.requests) >= 2 and fresh_issuer.pull_only == 0


def test_identity_token_uses_the_refresh_token_grant(
    token_registry: Registry, fresh_issuer: TokenIssuer, docker_config: Path, tmp_path: Path
) -> None:
    url, repo = store_url(token_registry)
    write_config(docker_config, {f"127.0.0.1:{token_registry.port}": {"identitytoken": "alice-refresh-token"}})
    with open_store(url) as store:
        store.put(KEY, make_tree(tmp_path / "src", seed=10, big_mib=1))
        assert [c.seq for c in store.list(KEY)] == [1]
    assert {(r.method, r.grant, r.user) for r in fresh_issuer.requests} == {("POST", "refresh_token", USER)}
    assert fresh_issuer.requests[0].scopes == [f"repository:{repo}:pull,push,delete"]

    write_config(docker_config, {f"127.0.0.1:{token_registry.port}": {"identitytoken": "revoked"}})
    with open_store(url) as store, pytest.raises(StoreError, match=r"authentication failed.*token service"):
        store.list(KEY)


def test_token_refused_or_missing_credentials_fail_clearly(
    token_registry: Registry,
    fresh_issuer: TokenIssuer,
    docker_config: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    url, _repo = store_url(token_registry)
    write_config(docker_config, {f"127.0.0.1:{token_registry.port}": _auth(USER, PASSWORD)})
    with open_store(url) as store:
        store.put(KEY, make_tree(tmp_path / "src", seed=11, big_mib=1))

    write_config(docker_config, {f"127.0.0.1:{token_registry.port}": _auth(USER, "wrong-password")})
    with open_store(url) as store, pytest.raises(StoreError, match=r"authentication failed.*refused") as refused:
        store.put(KEY, make_tree(tmp_path / "other", seed=12, big_mib=1))
    assert "wrong-password" not in str(refused.value)

    docker_config.unlink()  # anonymous: the issuer gives a token without access, the registry refuses it
    with open_store(url) as store, pytest.raises(StoreError, match="none are configured"):
        store.list(KEY)
    assert ("GET", None, "anonymous") in {(r.method, r.user, r.grant) for r in fresh_issuer.requests}

    issued = [r for r in caplog.records if "alice-secret" in r.getMessage() or "eyJ" in r.getMessage()]
    assert issued == [], "a password or token reached the logs"
    write_config(docker_config, {f"127.0.0.1:{token_registry.port}": _auth(USER, PASSWORD)})
    with open_store(url) as store:
        assert [c.seq for c in store.list(KEY)] == [1]


# ---------------------------------------------------------------------------------------------- redirects
class _Recorder(ThreadingHTTPServer):
    seen: list[tuple[str, str | None]]


def _serve(handler: type[BaseHTTPRequestHandler]) -> _Recorder:
    srv = _Recorder(("127.0.0.1", 0), handler)
    srv.seen = []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_authorization_is_not_forwarded_on_a_redirect_to_another_host(docker_config: Path) -> None:
    """Real registries answer blob GETs with a redirect to object storage or a CDN: the registry's
    credentials must stay with the registry. Two loopback stand-ins: a registry that asks for Basic
    credentials and redirects (to itself, then to the other origin), and the storage it redirects to."""

    class Storage(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.server.seen.append((self.path, self.headers.get("Authorization")))  # type: ignore[attr-defined]
            self.send_response(200)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"blob")

    storage = _serve(Storage)

    class Front(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            auth = self.headers.get("Authorization")
            self.server.seen.append((self.path, auth))  # type: ignore[attr-defined]
            if auth is None:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="stand-in"')
            elif self.path.endswith("/first"):
                self.send_response(307)
                self.send_header("Location", "/v2/repo/blobs/second")
            else:  # another origin: the storage server's port (docker's presigned URL case)
                self.send_response(307)
                self.send_header("Location", f"http://127.0.0.1:{storage.server_address[1]}/bucket/blob?sig=x")
            self.send_header("Content-Length", "0")
            self.end_headers()

    front = _serve(Front)
    try:
        host = f"127.0.0.1:{front.server_address[1]}"
        write_config(docker_config, {host: _auth(USER, PASSWORD)})
        backend = OCIBackend(host, "repo", {"insecure": "1"}, f"oci://{host}/repo?insecure=1")
        r = backend._req("GET", "/blobs/first", "GET blob")
        assert r.status == 200 and r.data == b"blob"
        basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        assert front.seen == [
            ("/v2/repo/blobs/first", None),
            ("/v2/repo/blobs/first", basic),
            ("/v2/repo/blobs/second", basic),
        ]
        assert storage.seen == [("/bucket/blob?sig=x", None)]
    finally:
        front.shutdown()
        storage.shutdown()
