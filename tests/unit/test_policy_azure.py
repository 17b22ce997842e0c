"""az:// store URLs in the node config and annotations (shim.protect.policy): Azure's naming rules, the options
the backend reads, `[azure] credentials_file` reaching every az:// URL, and annotations that may not name one."""

from __future__ import annotations

import pytest

from shim.protect.policy import STORE, NodeConfig, PolicyError, store_for, validate_store_url

CREDS = "/etc/revenant/azure.conn"
AZ = "az://prodckpt/checkpoints/team-a"


@pytest.mark.parametrize(
    "url",
    [
        AZ,
        "az://prodckpt/checkpoints",
        "az://devstoreaccount1/revenant-test/t-1?endpoint=http://127.0.0.1:10000/devstoreaccount1",
        "az://prodckpt/c-1-2?endpoint=https://blob.internal.example&block_mb=16&pack_mb=32&packs=false",
    ],
)
def test_az_urls_accepted(url: str) -> None:
    assert validate_store_url(url, "store") == url


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("az://Prod/checkpoints", "account name"),
        ("az://ab/checkpoints", "account name"),
        ("az://prodckpt/Checkpoints", "container name"),
        ("az://prodckpt/a--b", "container name"),
        ("az://prodckpt/-ab", "container name"),
        ("az://prodckpt/ckpt/../x", "prefix"),
        ("az://prodckpt/ckpt/a b", "prefix"),
        ("az://prodckpt/ckpt?endpoint=http://blob.example.com", "plain http"),
        ("az://prodckpt/ckpt?endpoint=http://10.0.0.5:10000/prodckpt", "plain http"),
        ("az://prodckpt/ckpt?endpoint=https://h.example/otheraccount", "endpoint must be"),
        ("az://prodckpt/ckpt?endpoint=ftp://h.example", "endpoint must be"),
        ("az://prodckpt/ckpt?block_mb=0", "block_mb"),
        ("az://prodckpt/ckpt?block_mb=101", "block_mb"),
        ("az://prodckpt/ckpt?pack_mb=1.5", "pack_mb"),
        ("az://prodckpt/ckpt?packs=maybe", "packs"),
        ("az://prodckpt/ckpt?region=eu", "unknown option"),
        ("az://user@prodckpt/ck", "user@"),
    ],
)
def test_bad_az_urls_refused(url: str, complaint: str) -> None:
    with pytest.raises(PolicyError, match=complaint):
        validate_store_url(url, "store")


def node(**extra: object) -> NodeConfig:
    data: dict[str, object] = {
        "stores": {"blob": {"url": AZ}, "disk": {"url": "file:///var/lib/store"}},
        "default_store": "blob",
        "azure": {"credentials_file": CREDS},
    }
    data.update(extra)
    return NodeConfig.from_dict(data, "config.toml")


def test_credentials_file_goes_to_az_stores_only() -> None:
    cfg = node()
    assert cfg.azure_credentials_file == CREDS
    assert cfg.stores["blob"] == f"{AZ}?credentials_file={CREDS}"
    assert cfg.store == cfg.stores["blob"]
    assert cfg.stores["disk"] == "file:///var/lib/store"
    assert store_for({STORE: "disk"}, cfg) == "file:///var/lib/store"


def test_annotation_url_gets_the_node_credentials_file() -> None:
    cfg = node(allow_store_urls=True)
    assert (
        store_for({STORE: "az://other/ckpt?block_mb=4"}, cfg) == f"az://other/ckpt?block_mb=4&credentials_file={CREDS}"
    )
    cfg = NodeConfig.from_dict({"allow_store_urls": True}, "config.toml")
    assert store_for({STORE: "az://other/ckpt"}, cfg) == "az://other/ckpt"


@pytest.mark.parametrize(
    "url",
    [
        "az://prodckpt/ckpt?credentials_file=/etc/shadow",
        "az://prodckpt/ckpt?block_mb=4&credentials%5Ffile=/etc/shadow",
    ],
)
def test_annotation_may_not_name_a_credentials_file(url: str) -> None:
    for cfg in (node(allow_store_urls=True), NodeConfig.from_dict({"allow_store_urls": True}, "config.toml")):
        with pytest.raises(PolicyError, match="Azure credentials come from the node configuration"):
            store_for({STORE: url}, cfg)


def test_annotation_url_needs_allow_store_urls() -> None:
    with pytest.raises(PolicyError, match="allow_store_urls"):
        store_for({STORE: "az://prodckpt/ckpt"}, node())


@pytest.mark.parametrize(
    "table",
    [
        {"credentials_file": "relative/azure.conn"},
        {"credentials_file": "/etc/a b"},
        {"credentials_file": "/etc/x&endpoint=http://evil"},
        {"credentials_file": "/etc/../root/x"},
        {"credentials_file": 5},
        {"credentials_file": CREDS, "account_key": "x"},
        {},
        "not a table",
    ],
)
def test_bad_azure_settings_are_refused(table: object) -> None:
    with pytest.raises(PolicyError, match=r"\[azure\]"):
        NodeConfig.from_dict({"azure": table}, "config.toml")
