"""What the store's backends read from disk, S3 and registries is checked too: stray names, long keys,
oversized objects, hostile registry answers, credentials, file permissions, descriptors."""

from __future__ import annotations

import contextlib
import http.server
import logging
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.servers import SERVER_FIXTURES
from harness.store_util import make_tree, tree_digest
from shim.store import ChunkCorrupt, StoreError, open_store
from shim.store.backends import local as local_backend

KEY = "default/mypod/main"
MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def test_file_store_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        store = open_store(f"file://{tmp_path}/store")
        store.put(KEY, make_tree(tmp_path / "src", seed=80, big_mib=2))
        loose = open_store(f"file://{tmp_path}/loose?packs=0")
        loose.put("x/y", tmp_path / "src")
    finally:
        os.umask(old)
    wide = []
    for base in (tmp_path / "store", tmp_path / "loose"):
        for dirpath, dirnames, filenames in os.walk(base):
            for name in [".", *dirnames, *filenames]:
                p = Path(dirpath) / name
                mode = stat.S_IMODE(os.lstat(p).st_mode)
                want = 0o700 if stat.S_ISDIR(os.lstat(p).st_mode) else 0o600
                if mode & ~want:
                    wide.append(f"{p.relative_to(tmp_path)} {mode:o}")
    assert not wide, wide


def test_existing_store_dirs_are_tightened(tmp_path: Path) -> None:
    for sub in ("chunks", "manifests", "locks", "tmp", "packs"):
        (tmp_path / "store" / sub).mkdir(parents=True)
        os.chmod(tmp_path / "store" / sub, 0o755)
    os.chmod(tmp_path / "store", 0o755)
    open_store(f"file://{tmp_path}/store")
    assert stat.S_IMODE(os.stat(tmp_path / "store").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "store" / "packs").st_mode) == 0o700


@pytest.mark.parametrize("backend", ["file", "file-loose", "s3", "az"])
def test_long_keys_round_trip(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """A Kubernetes key (253-character pod name) encodes past one file name's 255 bytes."""
    url = {
        "file": f"file://{tmp_path}/store",
        "file-loose": f"file://{tmp_path}/store?packs=0",
    }.get(backend) or request.getfixturevalue(SERVER_FIXTURES[backend]).url
    long_key = "team-namespace/" + "p" * 253 + "/main"
    other = "team-namespace/" + "p" * 253 + "/sidecar"  # same long prefix: must not collide
    src = make_tree(tmp_path / "src", seed=81, big_mib=1)
    store = open_store(url)
    assert store.put(long_key, src).seq == 1
    assert store.put(long_key, src).seq == 2
    assert store.put(other, src).seq == 1
    assert [(i.key, i.seq) for i in store.list()] == sorted([(long_key, 1), (long_key, 2), (other, 1)])
    assert store.get(long_key, tmp_path / "dest").seq == 2
    assert tree_digest(tmp_path / "dest") == tree_digest(src)
    assert store.verify() == [] and store.prune(long_key, keep=1) == [1]


def test_forged_key_file_is_not_trusted(tmp_path: Path) -> None:
    """A hashed key dir whose .key names another key is skipped (it would alias that key)."""
    long_key = "ns/" + "q" * 300
    store = open_store(f"file://{tmp_path}/store")
    store.put(long_key, make_tree(tmp_path / "src", seed=82, big_mib=1))
    (d,) = os.listdir(tmp_path / "store" / "manifests")
    (tmp_path / "store" / "manifests" / d / ".key").write_text("default/victim/main")
    assert open_store(f"file://{tmp_path}/store").list() == []


def _strays_file(root: Path) -> None:
    m = root / "manifests"
    (m / "junk-file").write_text("x")  # a file where key directories live
    (m / "%ZZ").mkdir()  # not an encoding
    (m / "%ZZ" / "0000000001-abc").write_text("x")
    (m / "%61").mkdir()  # a non-canonical encoding of "a"
    (m / "bad~name").mkdir()  # hashed form without a key file
    (m / "default%2Fmypod%2Fmain" / "not-a-manifest").write_text("x")
    (root / "locks" / "put-dir").mkdir()  # a directory among locks
    (root / "locks" / "put-huge").write_bytes(b"{" * (1 * MIB))
    (root / "chunks" / "zz").write_text("a file where a fan-out directory lives")


def _strays_objects(url: str) -> None:
    """Stray objects in an object store (s3://, az://), written beside the store's own."""
    from shim.store.backends.objects import ObjectBackend

    b = open_store(url).backend
    assert isinstance(b, ObjectBackend)
    for k in ("manifests/%ZZ/0000000001-abc", "manifests/%61/0000000001-abc", "manifests/junk", "locks/put-x/y"):
        b.put_object(k, b"x")
    b.put_object("locks/put-huge", b"{" * (1 * MIB))


@pytest.mark.parametrize("backend", ["file", "s3", "az"])
def test_stray_names_are_skipped(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store" if backend == "file" else request.getfixturevalue(SERVER_FIXTURES[backend]).url
    src = make_tree(tmp_path / "src", seed=83, big_mib=1)
    store = open_store(url)
    store.put(KEY, src)
    if backend == "file":
        _strays_file(tmp_path / "store")
    else:
        _strays_objects(url)
    fresh = open_store(url)
    assert [(i.key, i.seq) for i in fresh.list()] == [(KEY, 1)]
    assert fresh.verify() == []
    stats = fresh.gc(grace_seconds=0)
    assert "skipped" not in stats, stats  # a huge or unreadable lock is not a live writer
    assert fresh.put(KEY, src).seq == 2
    assert fresh.get(KEY, tmp_path / "dest").seq == 2


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_failing_puts_do_not_leak_descriptors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each failing put used to keep one fd per full pack until a put succeeded (EMFILE at ~16 GiB)."""
    monkeypatch.setattr(local_backend, "PACK_TARGET", 64 << 10)  # many full packs per put
    src = tmp_path / "src"
    src.mkdir()
    (src / "pages-1.img").write_bytes(os.urandom(4 * MIB))
    store = open_store(f"file://{tmp_path}/store", workers=2)

    def fail_late(done: int, total: int) -> None:
        if done > total * 3 // 4:
            raise RuntimeError("injected: the checkpoint source went away")

    before = _open_fds()
    for _ in range(5):
        with pytest.raises(RuntimeError, match="injected"):
            store.put(KEY, src, progress=fail_late)
    assert _open_fds() <= before + 1, "pack files left open by failed puts"
    store.close()
    assert _open_fds() <= before
    fresh = open_store(f"file://{tmp_path}/store")
    assert fresh.list(KEY) == []
    assert fresh.put(KEY, src).seq == 1 and fresh.verify() == []
    fresh.close()


def test_s3_without_credentials_fails_at_once(
    s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup off this host
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", raising=False)
    store = open_store(s3_server.url)
    with caplog.at_level(logging.WARNING), pytest.raises(StoreError, match="credentials") as err:
        store.put(KEY, make_tree(tmp_path / "src", seed=84, big_mib=1))
    assert "attempt" not in str(err.value)  # not BackendUnavailable after retries
    assert not [r for r in caplog.records if "retrying" in r.getMessage()], "credential errors were retried"


def test_s3_debug_log_has_no_secrets(s3_server, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", seed=85, big_mib=1)
    exe = str(Path(sys.executable).parent / "revenant")
    p = subprocess.run(
        [exe, "store", "put", "-v", "--store", s3_server.url, "--key", KEY, str(src)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    log = p.stderr
    assert "Authorization" in log, "the debug log no longer shows requests: this test proves nothing"
    from harness.servers import S3_SECRET_KEY

    assert S3_SECRET_KEY not in log
    import re

    assert not re.search(r"Signature=[0-9a-f]{16}", log), "request signatures in the log"
    assert not re.search(r"'Authorization': b'AWS4", log), "Authorization header in the log"
    assert "<redacted>" in log


# --------------------------------------------------------------------------- oversized objects

SIZE_CHILD = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from harness.store_util import rss_peak_reset, rss_peak
from shim.store import open_store, StoreError
store = open_store(sys.argv[2])
store.latest("warm/up")
base = rss_peak_reset()
try:
    store.get(sys.argv[3], Path(sys.argv[4]), fallback=False)
    outcome = "restored"
except StoreError as e:
    outcome = type(e).__name__ + ":" + str(e).replace(" ", "_")[:200]
print(outcome, rss_peak() - base)
"""


@pytest.mark.parametrize("backend", ["file-loose", "s3", "az"])
def test_oversized_chunk_object_is_not_read(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    from harness.store_util import manifest_doc, newest_name, replace_chunk

    srv = request.getfixturevalue(SERVER_FIXTURES[backend]) if backend != "file-loose" else None
    url = srv.url if srv else f"file://{tmp_path}/store?packs=0"
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(64 << 10))
    store = open_store(url)
    store.put(KEY, src)
    digest = manifest_doc(store, KEY, newest_name(store, KEY))["entries"][0]["chunks"][0][2]
    replace_chunk(store, srv, digest, b"\0" + os.urandom(96 * MIB))  # "raw", far over 64 KiB + 1
    p = subprocess.run(
        [sys.executable, "-c", SIZE_CHILD, str(ROOT / "tests"), url, KEY, str(tmp_path / "dest")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    outcome, grew = p.stdout.split()
    assert outcome.startswith("ChunkCorrupt")
    assert int(grew) < 32 * MIB, f"read {int(grew) >> 20} MiB of an object that could only be 64 KiB"


class HostileRegistry:
    """A loopback HTTP server answering registry paths with whatever a test sets (an attacker's registry)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict[str, str], bytes | int]] = {}
        self.hits: list[str] = []
        self.sent = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:
                outer.hits.append(self.path)
                status, headers, body = outer.routes.get(self.path.split("?")[0], (404, {}, b"{}"))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if isinstance(body, int):  # stream that many bytes
                    self.send_header("Content-Length", str(body))
                    self.end_headers()
                    piece = bytes(MIB)
                    with contextlib.suppress(OSError):
                        for _ in range(body // MIB):
                            self.wfile.write(piece)
                            outer.sent += len(piece)
                    return
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_HEAD = do_GET

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hostile_registries() -> Iterator[tuple[HostileRegistry, HostileRegistry]]:
    a, b = HostileRegistry(), HostileRegistry()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_registry_link_to_another_host_is_refused(hostile_registries) -> None:
    registry, elsewhere = hostile_registries
    link = f'<http://127.0.0.1:{elsewhere.port}/v2/repo/tags/list?n=1000&last=a>; rel="next"'
    registry.routes["/v2/repo/tags/list"] = (200, {"Link": link}, b'{"name":"repo","tags":["a"]}')
    store = open_store(f"oci://127.0.0.1:{registry.port}/repo?insecure=1")
    with pytest.raises(StoreError, match="points elsewhere"):
        store.list()
    assert elsewhere.hits == [], "the client followed a Link to another host"
    # A relative Link on the same registry is followed as before.
    registry.routes["/v2/repo/tags/list"] = (200, {"Link": '</v2/repo/tags/list2?n=1000>; rel="next"'}, b'{"tags":[]}')
    registry.routes["/v2/repo/tags/list2"] = (200, {}, b'{"tags":[]}')
    assert store.list() == [] and any(h.startswith("/v2/repo/tags/list2") for h in registry.hits)


def test_registry_oversized_answers_are_not_read(hostile_registries) -> None:
    registry, _ = hostile_registries
    registry.routes["/v2/repo/tags/list"] = (200, {}, 512 * MIB)  # a tag page of 512 MiB
    store = open_store(f"oci://127.0.0.1:{registry.port}/repo?insecure=1")
    with pytest.raises(StoreError, match="limit"):
        store.list()
    assert registry.sent < 64 * MIB
    blob = "sha256:" + "ab" * 32
    registry.routes[f"/v2/repo/blobs/{blob}"] = (200, {}, 256 * MIB)
    store.backend._blobs["c" * 64] = (blob, 65537)  # as a checkpoint's layer descriptor says
    registry.sent = 0
    with pytest.raises(StoreError, match="limit"):
        store.backend.get_chunk("c" * 64)
    assert registry.sent < 64 * MIB


def test_registry_garbage_answers_raise_store_errors(hostile_registries) -> None:
    registry, _ = hostile_registries
    store = open_store(f"oci://127.0.0.1:{registry.port}/repo?insecure=1")
    for body in (b"not json", b"[1,2]", b'{"tags": "abc"}', b'{"tags": [1, 2]}'):
        registry.routes["/v2/repo/tags/list"] = (200, {}, body)
        with pytest.raises(StoreError):
            store.list()
    registry.routes["/v2/repo/tags/list"] = (200, {}, b'{"tags": ["a.latest", "x"]}')
    registry.routes["/v2/repo/manifests/x"] = (200, {}, b'{"layers": "nope", "annotations": [1]}')
    assert store.list() == []
    with pytest.raises(ChunkCorrupt):
        store._fetch_verified("d" * 64, 10, "test")
