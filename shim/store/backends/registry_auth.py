"""Registry authentication for oci:// stores: HTTP Basic and the Docker token (bearer) flow.

Credentials come only from files the node owner controls, never from a pod annotation or the store URL:
first the node's `[registry] auth_file` (the store URL gets its path as `auth_file=` from the node
config, as with key files; an annotation URL may not name one), then `$DOCKER_CONFIG/config.json`, else
`~/.docker/config.json` of the user the shim runs as. Both are Docker config files: `auths.<host>` with
`auth` (base64 user:password), `username`/`password`, or `identitytoken` (an OAuth2 refresh token).
Credential helpers (`credsStore`, `credHelpers`) are not run.

What is sent where:
- A request first goes out without credentials, or with the Basic header / token this registry already
  asked for. A 401 names the scheme: Basic gets the host's credentials; Bearer runs the token flow
  against the realm the registry names (GET realm?service=&scope= with Basic credentials when there are
  any, anonymous otherwise; POST grant_type=refresh_token for an identity token), as docker does.
- Credentials go only to the registry host they are filed under and to the token realm that registry
  names; never over plain http unless the store URL says insecure=1 or that host is loopback.
- Redirects are followed here (GET/HEAD only, blob downloads redirect to object storage on real
  registries), and Authorization is dropped when a redirect leaves the registry's scheme, host and port.
  (urllib3 2.x strips Authorization on a cross-host redirect itself, but a PoolManager made with
  retries=False, as the backend's is, follows no redirect at all: the 307 came back as an error.)
- Tokens and passwords never appear in logs or error messages.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import urllib3

from shim import errors
from shim.hosts import is_loopback

from ..errors import StoreError
from .base import TransientError

log = logging.getLogger(__name__)

MAX_AUTH_FILE = 1 << 20  # a Docker config file larger than this is refused unread
MAX_TOKEN_DOC = 1 << 20  # a token server's answer is read up to this size
MAX_TOKEN = 64 << 10
DEFAULT_TOKEN_TTL = 60.0  # the token spec's default when expires_in is missing
MAX_TOKEN_TTL = 86400.0
MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
DOCKER_HUB = {"docker.io", "index.docker.io", "registry-1.docker.io"}
_PARAM = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')
_TOKEN_OK = re.compile(r"^[\x21-\x7e]+$")  # visible ASCII: nothing that could split a header


# Tokens shared by every backend in this process (the shim opens a store for each checkpoint): keyed by
# realm, service, scopes and a digest of the credentials they were fetched with, so rotated credentials
# ask anew. Entries are dropped when they run out or a registry refuses them.
_SHARED_TOKENS: dict[tuple[str, ...], tuple[str, float]] = {}
_SHARED_LOCK = threading.Lock()


class AuthenticationFailed(StoreError, errors.Unauthenticated):
    """The registry (or its token service) refused the credentials, or wants some and none are configured."""


@dataclass(frozen=True)
class Credentials:
    username: str = field(default="")
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    source: str = ""  # the file they came from, for error messages

    def basic(self) -> str | None:
        if not self.username:
            return None
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def docker_config_path() -> Path:
    """`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json` of the user this process runs as."""
    env = os.environ.get("DOCKER_CONFIG")
    return Path(env) / "config.json" if env else Path.home() / ".docker" / "config.json"


def read_auth_file(path: Path) -> dict[str, Any] | None:
    """A Docker config file's JSON object (None when the file does not exist). Read at each use, so a
    rotated secret is picked up; size-limited; a world-readable file is warned about."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"registry credentials file {path}: not a regular file")
            if st.st_mode & stat.S_IROTH:
                log.warning("registry credentials file %s is world-readable: chmod o-r it", path)
            raw = f.read(MAX_AUTH_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StoreError(f"registry credentials file {path}: cannot read it: {e.strerror}") from None
    if len(raw) > MAX_AUTH_FILE:
        raise StoreError(f"registry credentials file {path}: larger than {MAX_AUTH_FILE} bytes, refused")
    try:
        doc = json.loads(raw)
    except UnicodeDecodeError:
        raise StoreError(f"registry credentials file {path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:  # the message names a position only, never the text there
        raise StoreError(f"registry credentials file {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(doc, dict):
        raise StoreError(f"registry credentials file {path}: not a JSON object")
    return doc


def _entry_host(key: str) -> str:
    """An `auths` key as a host[:port]: docker writes `host`, `https://host/` or `https://index.docker.io/v1/`."""
    key = key.strip().lower()
    if "://" in key:
        key = urlsplit(key).netloc
    return key.split("/", 1)[0]


def _host_names(host: str) -> set[str]:
    host = host.lower()
    return DOCKER_HUB if host in DOCKER_HUB else {host}


def _parse_entry(entry: object, path: Path, host: str) -> Credentials | None:
    where = f"registry credentials file {path}, entry for {host}"
    if not isinstance(entry, dict):
        raise StoreError(f"{where}: not a JSON object")
    fields = {k: entry.get(k) for k in ("auth", "username", "password", "identitytoken")}
    for name, value in fields.items():
        if value is not None and not isinstance(value, str):
            raise StoreError(f"{where}: {name} is not a string")
    if fields["identitytoken"]:
        user = fields["username"] or ""
        return Credentials(username=str(user), identity_token=str(fields["identitytoken"]), source=str(path))
    if fields["auth"]:
        try:
            pair = base64.b64decode(str(fields["auth"]), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise StoreError(f"{where}: auth is not base64 of user:password") from None
        user, sep, password = pair.partition(":")
        if not sep or not user:
            raise StoreError(f"{where}: auth is not base64 of user:password")
        return Credentials(username=user, password=password, source=str(path))
    if fields["username"]:
        return Credentials(username=str(fields["username"]), password=str(fields["password"] or ""), source=str(path))
    return None


def credentials_for(host: str, auth_file: str | None) -> Credentials | None:
    """The credentials filed for host (host[:port] as in the store URL): the node's auth_file first,
    then the Docker config file. A configured auth_file that is missing is an error."""
    names = _host_names(host)
    files: list[Path] = []
    if auth_file:
        files.append(Path(auth_file))
    files.append(docker_config_path())
    for i, path in enumerate(files):
        doc = read_auth_file(path)
        if doc is None:
            if auth_file and i == 0:
                raise StoreError(f"registry credentials file {path} (the node's auth_file) does not exist")
            continue
        auths = doc.get("auths", {})
        if not isinstance(auths, dict):
            raise StoreError(f"registry credentials file {path}: auths is not a JSON object")
        for key, entry in auths.items():
            if isinstance(key, str) and _entry_host(key) in names:
                creds = _parse_entry(entry, path, host)
                if creds is not None:
                    return creds
        if doc.get("credsStore") or doc.get("credHelpers"):
            log.info("registry credentials file %s names credential helpers: revenant does not run them", path)
    return None


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="..",service="..",scope=".."` -> ("bearer", {realm:.., service:.., scope:..})."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    for m in _PARAM.finditer(rest):
        value = m[2]
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[m[1].lower()] = value
    return scheme.lower(), params


def _discard(r: urllib3.BaseHTTPResponse) -> None:
    """Done with a response whose body does not matter (a 401, a redirect)."""
    try:
        r.drain_conn()
    except urllib3.exceptions.HTTPError:
        r.close()
    r.release_conn()


class RegistryAuth:
    """Authorization for one repository on one registry, shared by the backend's threads."""

    def __init__(
        self,
        base: str,
        repo: str,
        *,
        pull_repos: list[str] | tuple[str, ...] = (),
        insecure: bool = False,
        auth_file: str | None = None,
    ) -> None:
        u = urlsplit(base)
        self.origin = (u.scheme, u.netloc)
        self.host = u.netloc
        self.insecure = insecure
        self.auth_file = auth_file
        # One scope for everything this backend does (it pushes, reads and deletes its own repository),
        # plus pull on the repositories it mounts blobs from.
        self.scopes = [f"repository:{repo}:pull,push,delete"] + [f"repository:{r}:pull" for r in pull_repos]
        self._lock = threading.Lock()
        self._scheme: str | None = None  # what the registry asked for: "basic" or "bearer"
        self._params: dict[str, str] = {}
        self._basic: str | None = None
        self._token: str | None = None
        self._token_until = 0.0  # time.monotonic() after which the token is renewed before use

    # ------------------------------------------------------------------ request
    def request(self, http: urllib3.PoolManager, method: str, url: str, **kw: Any) -> urllib3.BaseHTTPResponse:
        """Send the request; a 401 from the registry (first contact, or a cached token or Basic credentials
        it no longer takes) is answered once by taking up its challenge, a second 401 fails."""
        headers = dict(kw.pop("headers", None) or {})
        kw.pop("redirect", None)
        sent = self._authorization()
        r, final = self._send(http, method, url, headers, sent, kw)
        retried = False
        while r.status == 401 and self._ours(final):
            challenge = r.headers.get("WWW-Authenticate", "")
            _discard(r)
            if retried or not self._answer(challenge, sent):
                raise self._failed(sent)
            retried = True
            sent = self._authorization()
            r, final = self._send(http, method, url, headers, sent, kw)
        return r

    def _ours(self, url: str) -> bool:
        u = urlsplit(url)
        return (u.scheme, u.netloc) == self.origin

    def _send(
        self,
        http: urllib3.PoolManager,
        method: str,
        url: str,
        headers: dict[str, str],
        authorization: str | None,
        kw: dict[str, Any],
    ) -> tuple[urllib3.BaseHTTPResponse, str]:
        """One request, following GET/HEAD redirects with Authorization only on the registry's origin."""
        for _ in range(MAX_REDIRECTS + 1):
            h = dict(headers)
            if authorization and self._ours(url):
                h["Authorization"] = authorization
            r = http.request(method, url, headers=h, redirect=False, **kw)
            location = r.headers.get("Location")
            if r.status not in REDIRECTS or not location or method not in ("GET", "HEAD"):
                return r, url
            _discard(r)
            url = urljoin(url, location)
            if urlsplit(url).scheme not in ("http", "https"):
                raise StoreError(f"registry {self.host} redirected to a non-HTTP URL: refused")
        raise StoreError(f"registry {self.host}: more than {MAX_REDIRECTS} redirects")

    # ------------------------------------------------------------------ state
    def _authorization(self) -> str | None:
        """The header to send now: the Basic credentials, a live token (renewed if it ran out), or None."""
        with self._lock:
            if self._scheme == "basic":
                return self._basic
            if self._scheme == "bearer":
                if self._token is None or time.monotonic() >= self._token_until:
                    self._fetch_token()
                return f"Bearer {self._token}"
            return None

    def _answer(self, challenge: str, sent: str | None) -> bool:
        """Take in a 401's challenge; False when there is nothing new to try."""
        scheme, params = parse_challenge(challenge)
        with self._lock:
            if scheme == "basic":
                self._check_plain_http(self.origin[0], self.host, "the registry")
                creds = credentials_for(self.host, self.auth_file)  # read again: it may have been rotated
                basic = creds.basic() if creds else None
                if basic is None:
                    raise AuthenticationFailed(self._no_credentials())
                if self._scheme == "basic" and basic == sent:
                    return False  # exactly these credentials were refused
                self._scheme, self._basic = "basic", basic
                return True
            if scheme == "bearer":
                if not params.get("realm"):
                    raise AuthenticationFailed(f"registry {self.host} asks for a token but names no realm")
                if self._scheme == "bearer" and sent is not None and sent != f"Bearer {self._token}":
                    return True  # another thread renewed the token meanwhile: try that one
                self._scheme, self._params = "bearer", params
                if self._token is not None:  # expired or short of scope: nobody uses it again
                    with _SHARED_LOCK:
                        for k in [k for k, (t, _u) in _SHARED_TOKENS.items() if t == self._token]:
                            del _SHARED_TOKENS[k]
                self._token = None
                return True
            raise AuthenticationFailed(
                f"registry {self.host} asks for authentication scheme {scheme or '(none)'!r}, which revenant "
                "does not speak (Basic and Bearer only)"
            )

    def _check_plain_http(self, scheme: str, host: str, what: str) -> None:
        if scheme != "https" and not self.insecure and not is_loopback(urlsplit(f"//{host}").hostname or ""):
            raise AuthenticationFailed(
                f"registry {self.host}: {what} ({host}) is plain http: credentials are not sent there "
                "(the store URL must say insecure=1)"
            )

    def _failed(self, sent: str | None) -> AuthenticationFailed:
        if sent is None or (self._scheme == "bearer" and credentials_for(self.host, self.auth_file) is None):
            return AuthenticationFailed(self._no_credentials())
        return AuthenticationFailed(
            f"authentication failed at registry {self.host}: it refused the credentials for {self.host} "
            f"(or they lack access to {' '.join(self.scopes)})"
        )

    def _no_credentials(self) -> str:
        where = ([f"{self.auth_file} (node auth_file)"] if self.auth_file else []) + [str(docker_config_path())]
        return (
            f"authentication failed at registry {self.host}: it requires credentials and none are configured "
            f"for {self.host} (looked in {', '.join(where)})"
        )

    # ------------------------------------------------------------------ token flow
    def _fetch_token(self) -> None:
        """The Docker token flow (called with the lock held): sets self._token and its renewal time."""
        realm = self._params["realm"]
        ru = urlsplit(realm)
        if ru.scheme not in ("http", "https") or not ru.hostname or ru.username or ru.password:
            raise AuthenticationFailed(f"registry {self.host} names a token realm that is not an http(s) URL")
        creds = credentials_for(self.host, self.auth_file)
        if creds is not None:
            self._check_plain_http(ru.scheme, ru.netloc, "its token service")
        secret = repr(creds and (creds.username, creds.password, creds.identity_token)).encode()
        key = (realm, self._params.get("service", ""), *self.scopes, hashlib.sha256(secret).hexdigest())
        now = time.monotonic()
        with _SHARED_LOCK:
            for k in [k for k, (_t, until) in _SHARED_TOKENS.items() if until <= now]:
                del _SHARED_TOKENS[k]
            if key in _SHARED_TOKENS:
                self._token, self._token_until = _SHARED_TOKENS[key]
                return
        query: list[tuple[str, str]] = []
        if self._params.get("service"):
            query.append(("service", self._params["service"]))
        query += [("scope", s) for s in self.scopes]
        http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=30))
        try:
            if creds is not None and creds.identity_token:
                form = [("grant_type", "refresh_token"), ("refresh_token", creds.identity_token)]
                form += [("client_id", "revenant"), *query]
                r = http.request(
                    "POST",
                    realm,
                    body=urlencode(form).encode(),
                    headers={"Content-Type": "application/x-www-form-urlencoded"},
                    redirect=False,
                    preload_content=False,
                )
            else:
                headers = {}
                basic = creds.basic() if creds else None
                if basic and creds:
                    headers["Authorization"] = basic
                    query.append(("account", creds.username))
                sep = "&" if ru.query else "?"
                r = http.request(
                    "GET", realm + sep + urlencode(query), headers=headers, redirect=False, preload_content=False
                )
            try:
                body = r.read(MAX_TOKEN_DOC + 1)
            finally:
                r.release_conn()
        except urllib3.exceptions.HTTPError as e:
            raise TransientError(f"registry {self.host}: token service {ru.netloc}: {type(e).__name__}") from None
        finally:
            http.clear()
        if r.status in (401, 403):
            who = f"the credentials for {self.host}" if creds else "anonymous access"
            raise AuthenticationFailed(
                f"authentication failed at registry {self.host}: its token service {ru.netloc} refused {who} "
                f"(HTTP {r.status})"
            )
        if r.status >= 500 or r.status == 429:
            raise TransientError(f"registry {self.host}: token service {ru.netloc}: HTTP {r.status}")
        if r.status != 200:
            raise AuthenticationFailed(f"registry {self.host}: token service {ru.netloc} answered HTTP {r.status}")
        self._token, ttl = self._parse_token(body, ru.netloc)
        # Renew a little before the end, so a request does not leave with a token about to lapse.
        self._token_until = time.monotonic() + ttl - min(10.0, ttl / 4)
        with _SHARED_LOCK:
            _SHARED_TOKENS[key] = (self._token, self._token_until)
        log.info("registry %s: got a token for %s from %s, valid %gs", self.host, " ".join(self.scopes), ru.netloc, ttl)

    def _parse_token(self, body: bytes, where: str) -> tuple[str, float]:
        bad = f"registry {self.host}: token service {where} sent"
        if len(body) > MAX_TOKEN_DOC:
            raise StoreError(f"{bad} more than {MAX_TOKEN_DOC} bytes")
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise StoreError(f"{bad} an answer that is not JSON") from None
        if not isinstance(doc, dict):
            raise StoreError(f"{bad} an answer that is not a JSON object")
        token = doc.get("token") or doc.get("access_token")
        if not isinstance(token, str) or len(token) > MAX_TOKEN or not _TOKEN_OK.match(token):
            raise StoreError(f"{bad} no usable token (token or access_token)")
        ttl = doc.get("expires_in")
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
            ttl = DEFAULT_TOKEN_TTL
        return token, min(float(ttl), MAX_TOKEN_TTL)
