"""Registry credentials and challenges (shim.store.backends.registry_auth) without a registry: where the
credentials come from, how bad files fail, and what is refused before anything is sent."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import pytest

from shim.store import StoreError
from shim.store.backends.registry_auth import (
    DEFAULT_TOKEN_TTL,
    MAX_AUTH_FILE,
    MAX_TOKEN_TTL,
    AuthenticationFailed,
    RegistryAuth,
    credentials_for,
    parse_challenge,
)

SECRET = "hunter2-secret"


@pytest.fixture(autouse=True)
def docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "docker"
    d.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(d))
    return d / "config.json"


def write(path: Path, doc: object, mode: int = 0o600) -> Path:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    path.chmod(mode)
    return path


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_the_three_kinds_of_docker_config_entry(docker_config: Path) -> None:
    write(
        docker_config,
        {
            "auths": {
                "reg.example:5000": {"auth": b64(f"bob:{SECRET}:with-colon")},
                "https://other.example/": {"username": "carol", "password": SECRET},
                "ghcr.example": {"identitytoken": "refresh-me"},
            }
        },
    )
    a = credentials_for("reg.example:5000", None)
    assert a and (a.username, a.password) == ("bob", f"{SECRET}:with-colon")
    assert a.basic() == "Basic " + b64(f"bob:{SECRET}:with-colon")
    b = credentials_for("other.example", None)
    assert b and (b.username, b.password) == ("carol", SECRET)
    c = credentials_for("ghcr.example", None)
    assert c and c.identity_token == "refresh-me"
    assert SECRET not in repr(a) and "refresh-me" not in repr(c)
    # host[:port] must match exactly: no credentials for the same host on another port
    assert credentials_for("reg.example", None) is None
    assert credentials_for("reg.example:5001", None) is None


def test_docker_hub_entry_serves_its_registry_host(docker_config: Path) -> None:
    write(docker_config, {"auths": {"https://index.docker.io/v1/": {"auth": b64("dora:pw")}}})
    creds = credentials_for("registry-1.docker.io", None)
    assert creds and creds.username == "dora"


def test_node_auth_file_comes_first_and_must_exist(docker_config: Path, tmp_path: Path) -> None:
    write(docker_config, {"auths": {"reg.example": {"auth": b64("from-docker:pw")}}})
    node = write(tmp_path / "node.json", {"auths": {"reg.example": {"auth": b64("from-node:pw")}}})
    creds = credentials_for("reg.example", str(node))
    assert creds and creds.username == "from-node" and creds.source == str(node)
    write(node, {"auths": {}})  # nothing for this host in the node's file: the Docker config's
    creds = credentials_for("reg.example", str(node))
    assert creds and creds.username == "from-docker"
    node.unlink()
    with pytest.raises(StoreError, match=r"node\.json \(the node's auth_file\) does not exist"):
        credentials_for("reg.example", str(node))


def test_missing_docker_config_means_no_credentials() -> None:
    assert credentials_for("reg.example", None) is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"auths": {"reg.example": {"auth": "' + b64(f"u:{SECRET}") + '"}', "not valid JSON"),
        ('["' + SECRET + '"]', "not a JSON object"),
        ({"auths": {"reg.example": {"auth": "!!" + SECRET}}}, "auth is not base64"),
        ({"auths": {"reg.example": {"auth": b64(SECRET)}}}, "auth is not base64 of user:password"),
        ({"auths": {"reg.example": {"username": "u", "password": 7}}}, "password is not a string"),
        ({"auths": [SECRET]}, "auths is not a JSON object"),
        (b'{"x": "\xc3\x28' + SECRET.encode() + b'"}', "not UTF-8"),
    ],
)
def test_bad_files_name_the_file_and_never_the_secret(docker_config: Path, content: object, message: str) -> None:
    if isinstance(content, bytes):
        docker_config.write_bytes(content)
    else:
        write(docker_config, content)
    with pytest.raises(StoreError, match=message) as e:
        credentials_for("reg.example", None)
    assert str(docker_config) in str(e.value)
    assert SECRET not in str(e.value) and b64(f"u:{SECRET}") not in str(e.value)


def test_oversized_file_is_refused_unread(docker_config: Path) -> None:
    write(docker_config, json.dumps({"auths": {}, "pad": "x" * MAX_AUTH_FILE}))
    with pytest.raises(StoreError, match="larger than"):
        credentials_for("reg.example", None)


def test_world_readable_file_is_warned_about(docker_config: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(docker_config, {"auths": {"reg.example": {"auth": b64(f"u:{SECRET}")}}}, mode=0o644)
    with caplog.at_level(logging.WARNING):
        assert credentials_for("reg.example", None)
    assert "world-readable" in caplog.text and str(docker_config) in caplog.text
    caplog.clear()
    docker_config.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        credentials_for("reg.example", None)
    assert "world-readable" not in caplog.text


def test_parse_challenge() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.example/token",service="reg.example",scope="repository:a/b:pull,push"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.example/token",
        "service": "reg.example",
        "scope": "repository:a/b:pull,push",
    }
    assert parse_challenge('Basic realm="Registry Realm"') == ("basic", {"realm": "Registry Realm"})
    assert parse_challenge("") == ("", {})


def test_credentials_never_go_to_a_plain_http_realm(docker_config: Path) -> None:
    """The registry is https, its realm plain http on another host: refused before anything is sent."""
    write(docker_config, {"auths": {"reg.example": {"auth": b64(f"u:{SECRET}")}}})
    auth = RegistryAuth("https://reg.example/v2/repo", "repo")
    assert auth._answer('Bearer realm="http://auth.example/token",service="reg.example"', None)
    with pytest.raises(AuthenticationFailed, match="plain http: credentials are not sent there") as e:
        auth._authorization()
    assert SECRET not in str(e.value)


def test_realm_must_be_an_http_url(docker_config: Path) -> None:
    auth = RegistryAuth("https://reg.example/v2/repo", "repo")
    for realm in ("file:///etc/passwd", "https://user:pw@auth.example/token", "/relative"):
        auth._answer(f'Bearer realm="{realm}"', None)
        with pytest.raises(AuthenticationFailed, match="not an http"):
            auth._authorization()
    with pytest.raises(AuthenticationFailed, match="names no realm"):
        auth._answer("Bearer service=x", None)
    with pytest.raises(AuthenticationFailed, match="does not speak"):
        auth._answer('Negotiate realm="x"', None)


def test_basic_challenge_without_credentials_says_where_it_looked(docker_config: Path, tmp_path: Path) -> None:
    node = write(tmp_path / "node.json", {"auths": {}})
    auth = RegistryAuth("https://reg.example/v2/repo", "repo", auth_file=str(node))
    with pytest.raises(AuthenticationFailed, match="none are configured") as e:
        auth._answer('Basic realm="r"', None)
    assert str(node) in str(e.value) and str(docker_config) in str(e.value)


def test_scope_covers_the_repository_and_the_mount_sources() -> None:
    auth = RegistryAuth("https://reg.example/v2/team/store", "team/store", pull_repos=["team/base"])
    assert auth.scopes == ["repository:team/store:pull,push,delete", "repository:team/base:pull"]


@pytest.mark.parametrize(
    ("doc", "ttl"),
    [
        ({"token": "abc"}, DEFAULT_TOKEN_TTL),
        ({"access_token": "abc", "expires_in": 300}, 300.0),
        ({"token": "abc", "expires_in": 0}, DEFAULT_TOKEN_TTL),
        ({"token": "abc", "expires_in": "300"}, DEFAULT_TOKEN_TTL),
        ({"token": "abc", "expires_in": 10**12}, MAX_TOKEN_TTL),
    ],
)
def test_token_answers(doc: dict, ttl: float) -> None:
    auth = RegistryAuth("https://reg.example/v2/repo", "repo")
    assert auth._parse_token(json.dumps(doc).encode(), "auth.example") == ("abc", ttl)


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b'{"expires_in": 60}', b'{"token": "a b"}', b'{"token": "a\\r\\nX-Evil: 1"}', b'{"token": 5}'],
)
def test_unusable_token_answers_are_refused(body: bytes) -> None:
    auth = RegistryAuth("https://reg.example/v2/repo", "repo")
    with pytest.raises(StoreError, match=r"token service auth\.example sent"):
        auth._parse_token(body, "auth.example")
