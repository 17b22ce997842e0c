"""The node config's `[registry] auth_file` (shim.protect.policy): it reaches every oci:// store URL the
node hands out, and an annotation can neither name its own nor smuggle one in."""

from __future__ import annotations

import pytest

from shim.protect.policy import STORE, NodeConfig, PolicyError, store_for

AUTH = "/etc/revenant/registry-auth.json"


def node(**extra: object) -> NodeConfig:
    data: dict[str, object] = {
        "stores": {"reg": {"url": "oci://reg.example/team/store"}, "disk": {"url": "file:///var/lib/store"}},
        "default_store": "reg",
        "registry": {"auth_file": AUTH},
    }
    data.update(extra)
    return NodeConfig.from_dict(data, "config.toml")


def test_auth_file_goes_to_oci_stores_only() -> None:
    cfg = node()
    assert cfg.registry_auth_file == AUTH
    assert cfg.stores["reg"] == f"oci://reg.example/team/store?auth_file={AUTH}"
    assert cfg.store == cfg.stores["reg"]
    assert cfg.stores["disk"] == "file:///var/lib/store"
    assert store_for({}, cfg) == cfg.stores["reg"]
    assert store_for({STORE: "disk"}, cfg) == "file:///var/lib/store"


def test_auth_file_and_encryption_together() -> None:
    cfg = node(encryption={"key_file": "/etc/revenant/store.key"})
    assert cfg.store == f"oci://reg.example/team/store?key_file=/etc/revenant/store.key&auth_file={AUTH}"


def test_annotation_url_gets_the_node_auth_file() -> None:
    cfg = node(allow_store_urls=True)
    got = store_for({STORE: "oci://other.example/x?insecure=1"}, cfg)
    assert got == f"oci://other.example/x?insecure=1&auth_file={AUTH}"


@pytest.mark.parametrize(
    "url",
    [
        "oci://reg.example/x?auth_file=/etc/shadow",
        "oci://reg.example/x?insecure=1&auth_file=/root/.docker/config.json",
        "oci://reg.example/x?auth%5Ffile=/etc/shadow",
    ],
)
def test_annotation_may_not_name_an_auth_file(url: str) -> None:
    for cfg in (node(allow_store_urls=True), NodeConfig.from_dict({"allow_store_urls": True}, "config.toml")):
        with pytest.raises(PolicyError, match="registry credentials come from the node configuration"):
            store_for({STORE: url}, cfg)


def test_annotation_may_not_smuggle_an_encoded_key_file() -> None:
    cfg = node(allow_store_urls=True)
    with pytest.raises(PolicyError, match="encryption keys come from the node configuration"):
        store_for({STORE: "oci://reg.example/x?key%5Ffile=/etc/shadow"}, cfg)


@pytest.mark.parametrize(
    "table",
    [
        {"auth_file": "relative/path.json"},
        {"auth_file": "/etc/a b.json"},
        {"auth_file": "/etc/x.json&insecure=1"},
        {"auth_file": "/etc/../root/x.json"},
        {"auth_file": 5},
        {"auth_file": AUTH, "password": "x"},
        {},
        "not a table",
    ],
)
def test_bad_registry_settings_are_refused(table: object) -> None:
    with pytest.raises(PolicyError, match=r"\[registry\]"):
        NodeConfig.from_dict({"registry": table}, "config.toml")
