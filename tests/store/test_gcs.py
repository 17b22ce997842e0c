"""The gs:// backend's own parts: the GCS conditional create (x-goog-if-generation-match: 0) and request
shape, HMAC credentials, metadata-server bearer tokens, and refusal of bad bucket names, options and endpoints.

Which server is which: SeaweedFS (gs_server) is a real S3 server that verifies the SigV4 signatures, so
the requests below that reach it are signed as GCS's XML API takes them; it ignores the x-goog precondition,
so the conditional create runs against GCSRecorder (tests/harness/gcs_recorder.py), a loopback recorder that
applies the documented precondition and refuses what the XML API refuses. Neither is Google's service.
Bearer tokens: SeaweedFS does not take them, so they are tried against the recorder, with the token issued
by the metadata-server harness (tests/harness/metadata_server.py) at the documented path.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from harness.gcs_recorder import GCSRecorder
from harness.metadata_server import MetadataServer
from harness.servers import S3_ACCESS_KEY, S3_SECRET_KEY
from harness.store_util import MIB, make_tree, tree_digest
from shim.store import Fenced, StoreError, open_store
from shim.store.backends import open_backend
from shim.store.backends.base import TransientError
from shim.store.backends.gcs import GCSBackend, check_bucket_name

KEY = "default/mypod/main"
BUCKET = "revenant-test"


@pytest.fixture
def gs_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GS_ACCESS_KEY_ID", S3_ACCESS_KEY)
    monkeypatch.setenv("GS_SECRET_ACCESS_KEY", S3_SECRET_KEY)


@pytest.fixture
def recorder(gs_env: None):
    with GCSRecorder(BUCKET) as r:
        yield r


def secret_file(tmp_path: Path, text: str = S3_SECRET_KEY + "\n", mode: int = 0o600) -> Path:
    p = tmp_path / "gcs-secret"
    p.write_text(text)
    p.chmod(mode)
    return p


# ------------------------------------------------------------------ conditional create (owner epochs)


def test_conditional_create_uses_the_signed_generation_precondition(recorder: GCSRecorder) -> None:
    b = open_backend(f"gs://{BUCKET}/p?endpoint={recorder.endpoint}")
    assert b.create_epoch(KEY, 1, b"first") is True
    assert b.create_epoch(KEY, 1, b"second") is False  # 412 from the precondition
    assert b.list_epochs(KEY) == [1]
    assert b.conditional_writes() is True  # the probe saw the second create refused
    puts = [s for s in recorder.seen if s.method == "PUT"]
    assert puts and all(s.headers["x-goog-if-generation-match"] == "0" for s in puts)
    assert all("x-goog-if-generation-match" in s.signed for s in puts), "the precondition must be signed"
    assert not any("If-None-Match" in s.headers for s in recorder.seen), "S3's header is not the XML API's"
    assert [s.status for s in puts] == [200, 412, 200, 412]  # probe twice, then the epoch twice
    # The object the refused create aimed at still holds the first body.
    (body, _, _) = recorder.objects[f"p/epochs/{KEY.replace('/', '%2F')}/0000000001"]
    assert body == b"first"
    b.close()


def test_requests_have_the_xml_api_shape(recorder: GCSRecorder) -> None:
    b = open_backend(f"gs://{BUCKET}/pre/fix?endpoint={recorder.endpoint}&packs=0")
    b.put_object("a/one", b"x" * 1000)
    assert b.get_object("a/one", 4096) == b"x" * 1000
    assert b.object_exists("a/one") and not b.object_exists("a/two")
    assert [n for n, _, _ in b.list_objects("a/")] == ["a/one"]
    b.delete_object("a/one")
    statuses = [(s.method, s.path, s.status) for s in recorder.seen]
    assert all(s.status in (200, 204, 404) for s in recorder.seen), statuses
    assert all(s.region == "auto" for s in recorder.seen)  # SigV4 scope GCS expects
    assert all(s.path.startswith(f"/{BUCKET}/") or s.path.startswith(f"/{BUCKET}?") for s in recorder.seen)
    assert all(not any(k.lower().startswith("x-amz-checksum") for k in s.headers) for s in recorder.seen)
    b.close()


def test_racing_claimers_get_distinct_epochs_and_the_old_owner_is_fenced(recorder: GCSRecorder, tmp_path: Path) -> None:
    url = f"gs://{BUCKET}/race?endpoint={recorder.endpoint}"
    got: list[int] = []
    start = threading.Barrier(6)

    def claim(i: int) -> None:
        store = open_store(url)
        start.wait()
        got.append(store.claim(KEY, f"node-{i}"))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 7)), got  # create-only: no epoch taken twice, none skipped
    refused = [s for s in recorder.seen if s.method == "PUT" and s.status == 412 and "/epochs/" in s.path]
    assert refused, "six racing claimers must have collided on at least one epoch"
    old, new = open_store(url), open_store(url)
    tree = make_tree(tmp_path / "t", seed=1, big_mib=1)
    mine = old.claim(KEY, "node-old")
    assert old.put(KEY, tree, epoch=mine).seq == 1
    newer = new.claim(KEY, "node-new")
    with pytest.raises(Fenced):
        old.put(KEY, tree, epoch=mine)
    assert new.put(KEY, tree, epoch=newer).seq == 2
    new.get(KEY, tmp_path / "r")
    assert tree_digest(tmp_path / "r") == tree_digest(tree)


# ------------------------------------------------------------------ against SeaweedFS


def test_no_checksum_headers_on_any_request_multipart_included(gs_server, tmp_path: Path) -> None:
    """botocore >= 1.36 adds x-amz-checksum-* and aws-chunked bodies the XML API refuses; SeaweedFS takes
    them, so what goes out is looked at on the client's own send hook."""
    store = open_store(gs_server.url + "&multipart_mb=5&pack_mb=12")
    sent: list[dict[str, str]] = []
    store.backend.s3.meta.events.register("before-send.s3", lambda request, **_: sent.append(dict(request.headers)))
    src = tmp_path / "src"
    src.mkdir()
    (src / "pages-1.img").write_bytes(os.urandom(30 * MIB))  # incompressible: 12 MiB packs go up in 5 MiB parts
    store.put(KEY, src)
    store.get(KEY, tmp_path / "dest")
    assert tree_digest(tmp_path / "dest") == tree_digest(src)
    assert any("uploadId=" in str(h) or h.get("Content-Length") == str(5 * MIB) for h in sent), "no multipart part"
    for headers in sent:
        names = {k.lower() for k in headers}
        assert not {n for n in names if n.startswith("x-amz-checksum") or n == "x-amz-sdk-checksum-algorithm"}, headers
        assert "aws-chunked" not in str(headers.get("Content-Encoding", b"")), headers
        auth = headers["Authorization"]
        auth = auth.decode() if isinstance(auth, bytes) else auth
        assert f"Credential={S3_ACCESS_KEY}/" in auth and "/auto/s3/aws4_request" in auth


def test_secret_file_credentials_work_and_aws_ones_are_never_used(
    gs_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = secret_file(tmp_path)
    monkeypatch.delenv("GS_ACCESS_KEY_ID")
    monkeypatch.delenv("GS_SECRET_ACCESS_KEY")
    # The AWS variables hold SeaweedFS's valid key here: the gs backend must not pick them up.
    assert os.environ.get("AWS_ACCESS_KEY_ID") == S3_ACCESS_KEY
    with pytest.raises(StoreError, match=r"no HMAC key.*GS_ACCESS_KEY_ID"):
        open_store(gs_server.url)
    url = f"{gs_server.url}&hmac_key_id={S3_ACCESS_KEY}&hmac_secret_file={secret}"
    store = open_store(url)
    assert store.backend.credential_source == f"hmac_secret_file {secret}"
    src = make_tree(tmp_path / "src", seed=3, big_mib=1)
    store.put(KEY, src)
    store.get(KEY, tmp_path / "dest")
    assert tree_digest(tmp_path / "dest") == tree_digest(src)
    # A wrong secret is refused by the server (the signature is really checked), with no secret in the error.
    secret.write_text("not-the-secret-at-all\n")
    with pytest.raises(StoreError) as err:
        open_store(url).list(KEY)
    assert "not-the-secret" not in str(err.value) and S3_SECRET_KEY not in str(err.value)


@pytest.mark.parametrize(
    ("text", "mode", "match"),
    [
        (S3_SECRET_KEY, 0o640, "mode 0640 lets group or others in"),
        (S3_SECRET_KEY, 0o604, "mode 0604"),
        ("x" * 5000, 0o600, "larger than 4096 bytes"),
        ("two words", 0o600, "not an HMAC secret"),
        ("", 0o600, "not an HMAC secret"),
    ],
)
def test_bad_secret_files_refused_without_quoting_them(
    gs_env: None, tmp_path: Path, text: str, mode: int, match: str
) -> None:
    p = secret_file(tmp_path, text, mode)
    with pytest.raises(StoreError, match=match) as err:
        open_backend(f"gs://{BUCKET}/p?hmac_key_id=GOOG1EXAMPLE&hmac_secret_file={p}")
    assert "two words" not in str(err.value)


def test_secret_file_must_be_a_regular_file_not_a_link(gs_env: None, tmp_path: Path) -> None:
    real = secret_file(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(real)
    for path, match in ((link, "Too many levels of symbolic links"), (tmp_path, "not a regular file|Is a directory")):
        with pytest.raises(StoreError, match=match):
            open_backend(f"gs://{BUCKET}/p?hmac_key_id=GOOG1EXAMPLE&hmac_secret_file={path}")
    with pytest.raises(StoreError, match="No such file"):
        open_backend(f"gs://{BUCKET}/p?hmac_key_id=GOOG1EXAMPLE&hmac_secret_file={tmp_path}/missing")
    with pytest.raises(StoreError, match="absolute path"):
        open_backend(f"gs://{BUCKET}/p?hmac_key_id=GOOG1EXAMPLE&hmac_secret_file=relative/secret")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file to another user")
def test_secret_file_of_another_user_refused(gs_env: None, tmp_path: Path) -> None:
    p = secret_file(tmp_path)
    os.chown(p, 65534, 65534)
    with pytest.raises(StoreError, match="owned by uid 65534"):
        open_backend(f"gs://{BUCKET}/p?hmac_key_id=GOOG1EXAMPLE&hmac_secret_file={p}")


def test_half_given_or_malformed_credentials_refused(gs_env: None, tmp_path: Path, monkeypatch) -> None:
    p = secret_file(tmp_path)
    with pytest.raises(StoreError, match="go together"):
        open_backend(f"gs://{BUCKET}/p?hmac_key_id=GOOG1EXAMPLE")
    with pytest.raises(StoreError, match="go together"):
        open_backend(f"gs://{BUCKET}/p?hmac_secret_file={p}")
    with pytest.raises(StoreError, match=r"access id .* is not one"):
        open_backend(f"gs://{BUCKET}/p?hmac_key_id=bad%0Aid&hmac_secret_file={p}")
    monkeypatch.setenv("GS_SECRET_ACCESS_KEY", "has space")
    with pytest.raises(StoreError, match="GS_SECRET_ACCESS_KEY is not an HMAC secret"):
        open_backend(f"gs://{BUCKET}/p")


# ------------------------------------------------------------------ names, options, endpoints

GOOD_BUCKETS = ["abc", "my-bucket_1", "a" * 63, "example.com.ckpt", ".".join(["a" * 63] * 3)]
BAD_BUCKETS = [
    "ab",  # too short
    "a" * 64,  # too long without dots
    "My-Bucket",  # upper case
    "-bucket",
    "bucket-",
    "buck et",
    "192.168.5.4",  # an IP address
    "goog-ckpt",  # reserved prefix
    "my-google-bucket",
    "my-g00gle-bucket",
    "a..b",  # an empty dot-separated part
    ".".join(["a" * 63] * 4),  # over 222
    "b" * 64 + ".com",  # a part over 63
]


@pytest.mark.parametrize("name", GOOD_BUCKETS)
def test_valid_bucket_names_accepted(name: str) -> None:
    check_bucket_name(name)


@pytest.mark.parametrize("name", BAD_BUCKETS)
def test_invalid_bucket_names_refused(gs_env: None, name: str) -> None:
    with pytest.raises(StoreError, match="not a GCS bucket name"):
        check_bucket_name(name)
    with pytest.raises(StoreError, match="not a GCS bucket name"):
        open_backend(f"gs://{name}/prefix")


@pytest.mark.parametrize(
    ("query", "match"),
    [
        ("region=us-east-1", "unknown option.*region"),
        ("auth_file=/etc/x", "unknown option.*auth_file"),
        ("endpoint=http://storage.example.com", "plain http only to a loopback"),
        ("endpoint=http://10.0.0.1:9000", "plain http only to a loopback"),
        ("endpoint=ftp://127.0.0.1", "expected https"),
        ("endpoint=https://u:p@storage.example.com", "no user@"),
        ("endpoint=https://storage.example.com/path", "expected https"),
        ("endpoint=https://storage.example.com:99999", "not a URL"),
    ],
)
def test_bad_options_and_endpoints_refused(gs_env: None, query: str, match: str) -> None:
    with pytest.raises(StoreError, match=match):
        open_backend(f"gs://{BUCKET}/p?{query}")


def test_defaults_and_accepted_endpoints(gs_env: None) -> None:
    b = open_backend(f"gs://{BUCKET}/p")
    assert isinstance(b, GCSBackend)
    assert b.s3.meta.endpoint_url == "https://storage.googleapis.com" and b.s3.meta.region_name == "auto"
    assert b.s3.meta.config.s3["addressing_style"] == "path"
    assert b.s3.meta.config.request_checksum_calculation == "when_required"
    for ep in ("https://storage.example.com", "http://127.0.0.1:8333", "http://[::1]:8333", "http://localhost:1"):
        assert open_backend(f"gs://{BUCKET}/p?endpoint={ep}").s3.meta.endpoint_url == ep
    with pytest.raises(StoreError, match=r"'\.\.' is not allowed"):
        open_backend(f"gs://{BUCKET}/a/../b")


# ------------------------------------------------------------------ metadata-server bearer tokens


@pytest.fixture
def metadata(monkeypatch: pytest.MonkeyPatch):
    for var in ("GS_ACCESS_KEY_ID", "GS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    with MetadataServer(providers=("gcp",)) as md:
        monkeypatch.setenv("GCE_METADATA_HOST", md.url.removeprefix("http://"))
        yield md


def test_bearer_token_from_the_metadata_server(
    metadata: MetadataServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    live: set[str] = set()
    with GCSRecorder(BUCKET, bearer_ok=lambda t: t in live) as rec:
        live.update(metadata.state.gcp_tokens)  # none issued yet: every token must come from the server
        rec.bearer_ok = lambda t: t in metadata.state.gcp_tokens
        store = open_store(f"gs://{BUCKET}/wi?endpoint={rec.endpoint}&auth=metadata")
        assert store.backend.credential_source.startswith("metadata server http://127.0.0.1:")
        src = make_tree(tmp_path / "src", seed=4, big_mib=1)
        assert store.claim(KEY, "node-a") == 1
        store.put(KEY, src, epoch=1)
        store.get(KEY, tmp_path / "dest")
        assert tree_digest(tmp_path / "dest") == tree_digest(src)
        assert len(metadata.state.gcp_tokens) == 1, "one token, reused while it is valid"
        asked = metadata.requests_to("/computeMetadata/v1/instance/service-accounts/default/token")
        assert asked and all(s.headers["Metadata-Flavor"] == "Google" for s in asked)
        assert rec.seen and all(s.bearer == metadata.state.gcp_tokens[0] and not s.signed for s in rec.seen)
        # The precondition still goes out (unsigned now, covered by the bearer token).
        assert any(s.headers.get("x-goog-if-generation-match") == "0" and s.status == 200 for s in rec.seen)
        # A token close to its end is renewed before use; botocore's debug log never shows it.
        metadata.state.gcp_token_ttl = 61
        store.backend.token._renew_at = 0.0
        with caplog.at_level(logging.DEBUG):
            store.list(KEY)
        assert "Authorization" in caplog.text and not any(t in caplog.text for t in metadata.state.gcp_tokens)
        first_short = metadata.state.gcp_tokens[-1]
        assert len(metadata.state.gcp_tokens) == 2 and rec.seen[-1].bearer == first_short
        assert store.backend.token._renew_at - __import__("time").monotonic() <= 31
        # A token the service refuses fails the request; the message holds no token.
        rec.bearer_ok = lambda t: False
        with pytest.raises(StoreError) as err:
            open_store(f"gs://{BUCKET}/wi?endpoint={rec.endpoint}&auth=metadata").list(KEY)
        assert not any(t in str(err.value) for t in metadata.state.gcp_tokens)


def test_metadata_server_answers_are_checked(metadata: MetadataServer, monkeypatch: pytest.MonkeyPatch) -> None:
    b = open_backend(f"gs://{BUCKET}/wi?auth=metadata")
    assert b.token is not None
    b.token.get()  # the harness's answer is a good one
    for ttl, match in ((0, "expires_in 0"), (86401, "expires_in 86401")):
        metadata.state.gcp_token_ttl = ttl
        b.token._renew_at = 0.0
        with pytest.raises(StoreError, match=match):
            b.token.get()
    metadata.state.providers.clear()  # answers 404 now, as a non-GCP metadata server would
    b.token._renew_at = 0.0
    with pytest.raises(StoreError, match="HTTP 404"):
        b.token.get()
    metadata.stop()
    with pytest.raises(TransientError, match="service-account token"):
        b.token.get()
    monkeypatch.setenv("GCE_METADATA_HOST", "evil.example/x?")
    with pytest.raises(StoreError, match="not HOST"):
        open_backend(f"gs://{BUCKET}/wi?auth=metadata")


@pytest.mark.parametrize(
    ("query", "match"),
    [
        ("auth=metadata&hmac_key_id=GOOG1EXAMPLE&hmac_secret_file=/x", "exclude each other"),
        ("auth=oauth", "is not hmac or metadata"),
        ("auth=metadata&endpoint=http://storage.example.com", "plain http only to a loopback"),
    ],
)
def test_bad_auth_options_refused(metadata: MetadataServer, query: str, match: str) -> None:
    with pytest.raises(StoreError, match=match):
        open_backend(f"gs://{BUCKET}/wi?{query}")
