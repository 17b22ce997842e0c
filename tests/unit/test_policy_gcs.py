"""The node config's `[gcs]` HMAC key and gs:// store URLs (shim.protect.policy): the key reaches every gs://
store URL the node hands out, an annotation can neither name its own nor smuggle one in, and a gs:// URL is
checked at Create (bucket name, options, endpoint)."""

from __future__ import annotations

import pytest

from shim.protect.policy import STORE, NodeConfig, PolicyError, store_for, validate_store_url

SECRET = "/etc/revenant/gcs-hmac-secret"
KEY_ID = "GOOG1EXAMPLEKEYID"
HMAC = f"hmac_key_id={KEY_ID}&hmac_secret_file={SECRET}"


def node(**extra: object) -> NodeConfig:
    data: dict[str, object] = {
        "stores": {"gcs": {"url": "gs://ckpt-bucket/prod"}, "aws": {"url": "s3://ckpt-bucket/prod"}},
        "default_store": "gcs",
        "gcs": {"hmac_key_id": KEY_ID, "hmac_secret_file": SECRET},
    }
    data.update(extra)
    return NodeConfig.from_dict(data, "config.toml")


def test_hmac_key_goes_to_gs_stores_only() -> None:
    cfg = node()
    assert cfg.gcs_auth == (("hmac_key_id", KEY_ID), ("hmac_secret_file", SECRET))
    assert cfg.stores["gcs"] == f"gs://ckpt-bucket/prod?{HMAC}"
    assert cfg.store == cfg.stores["gcs"]
    assert cfg.stores["aws"] == "s3://ckpt-bucket/prod"
    assert store_for({STORE: "aws"}, cfg) == "s3://ckpt-bucket/prod"


def test_hmac_key_and_encryption_together() -> None:
    cfg = node(encryption={"key_file": "/etc/revenant/store.key"})
    assert cfg.store == f"gs://ckpt-bucket/prod?key_file=/etc/revenant/store.key&{HMAC}"


def test_annotation_url_gets_the_node_hmac_key() -> None:
    cfg = node(allow_store_urls=True)
    assert store_for({STORE: "gs://other-bucket/x"}, cfg) == f"gs://other-bucket/x?{HMAC}"
    assert store_for({STORE: "s3://other-bucket/x"}, cfg) == "s3://other-bucket/x"


def test_metadata_auth_goes_to_gs_stores() -> None:
    cfg = node(gcs={"auth": "metadata"}, allow_store_urls=True)
    assert cfg.store == "gs://ckpt-bucket/prod?auth=metadata"
    assert cfg.stores["aws"] == "s3://ckpt-bucket/prod"
    assert store_for({STORE: "gs://other-bucket/x"}, cfg) == "gs://other-bucket/x?auth=metadata"


@pytest.mark.parametrize(
    "url",
    [
        "gs://other-bucket/x?hmac_secret_file=/etc/shadow",
        "gs://other-bucket/x?hmac_key_id=GOOG1ATTACKER",
        "gs://other-bucket/x?packs=0&hmac%5Fsecret_file=/etc/shadow",
        "gs://other-bucket/x?auth=metadata",
        "gs://other-bucket/x?au%74h=metadata",
    ],
)
def test_annotation_may_not_name_gcs_credentials(url: str) -> None:
    for cfg in (node(allow_store_urls=True), NodeConfig.from_dict({"allow_store_urls": True}, "config.toml")):
        with pytest.raises(PolicyError, match="GCS credentials come from the node configuration"):
            store_for({STORE: url}, cfg)


@pytest.mark.parametrize(
    "table",
    [
        {"hmac_key_id": KEY_ID},
        {"hmac_secret_file": SECRET},
        {"hmac_key_id": KEY_ID, "hmac_secret_file": "relative/secret"},
        {"hmac_key_id": KEY_ID, "hmac_secret_file": "/etc/../root/secret"},
        {"hmac_key_id": KEY_ID, "hmac_secret_file": "/etc/x&endpoint=http://evil"},
        {"hmac_key_id": "GOOG1&endpoint=x", "hmac_secret_file": SECRET},
        {"hmac_key_id": KEY_ID, "hmac_secret_file": SECRET, "secret": "inline"},
        {"hmac_key_id": KEY_ID, "hmac_secret_file": SECRET, "auth": "metadata"},
        {"auth": "oauth"},
        "not a table",
    ],
)
def test_bad_gcs_settings_are_refused(table: object) -> None:
    with pytest.raises(PolicyError, match=r"\[gcs\]"):
        NodeConfig.from_dict({"gcs": table}, "config.toml")


@pytest.mark.parametrize(
    "url",
    [
        "gs://ckpt-bucket/prod",
        "gs://ckpt.example.com/prod?endpoint=https://storage.example.com&pack_mb=32",
        "gs://ckpt-bucket/p?endpoint=http://127.0.0.1:8333&packs=0&multipart_mb=16",
    ],
)
def test_good_gs_urls(url: str) -> None:
    assert validate_store_url(url, "store") == url


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("gs://Bad_Bucket/p", "not a GCS bucket name"),
        ("gs://goog-ckpt/p", "not a GCS bucket name"),
        ("gs://my-google-ckpt/p", "not a GCS bucket name"),
        ("gs://ckpt-bucket/p?region=us-east-1", "unknown option"),
        ("gs://ckpt-bucket/p?endpoint=http://storage.example.com", "plain http only to a loopback"),
        ("gs://ckpt-bucket/p?pack_mb=0", "pack_mb"),
        ("gs://ckpt-bucket/p?hmac_key_id=bad-id!", "not a GCS HMAC access id"),
        ("gs://ckpt-bucket/p?auth=oauth", "is not hmac or metadata"),
        ("gs://user@ckpt-bucket/p", "no fragment or user@"),
    ],
)
def test_bad_gs_urls(url: str, match: str) -> None:
    with pytest.raises(PolicyError, match=match):
        validate_store_url(url, "store")


def test_replica_urls_get_the_node_hmac_key() -> None:
    cfg = NodeConfig.from_dict(
        {
            "stores": {"gcs": {"url": "gs://ckpt-bucket/prod", "replicas": ["gs://ckpt-bucket-eu/prod"]}},
            "default_store": "gcs",
            "gcs": {"hmac_key_id": KEY_ID, "hmac_secret_file": SECRET},
        },
        "config.toml",
    )
    assert cfg.replicas["gcs"] == (f"gs://ckpt-bucket-eu/prod?{HMAC}",)
