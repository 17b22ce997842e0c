"""Replicas in the node config ([stores.NAME] replicas, failover): validated like primaries, only the
node config adds them, and they carry the node's key files and registry credentials."""

from __future__ import annotations

import pytest

from shim.protect.policy import MAX_REPLICAS, NodeConfig, PolicyError, protection_for

KEY = {"revenant.io/checkpoint-key": "team/job"}

CONFIG = """
default_store = "main"
[stores.main]
url = "s3://main-bucket/ckpt?endpoint=http://127.0.0.1:8333"
replicas = ["dr", "oci://registry.example:5000/team/ckpt"]
failover = true
[stores.dr]
url = "file:///srv/dr-store"
[stores.plain]
url = "file:///srv/plain"
"""


def _node(tmp_path, text: str) -> NodeConfig:
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    return NodeConfig.load(cfg)


def test_replicas_by_name_or_url_reach_the_protection(tmp_path):
    node = _node(tmp_path, CONFIG)
    assert node.replicas == {"main": ("file:///srv/dr-store", "oci://registry.example:5000/team/ckpt")}
    assert node.failover == {"main"}
    p = protection_for(KEY, node)
    assert p is not None and p.store == node.store
    assert p.replicas == ("file:///srv/dr-store", "oci://registry.example:5000/team/ckpt") and p.failover
    # A store without replicas, and the replica store itself picked as a primary: no replicas.
    for name in ("plain", "dr"):
        p = protection_for({**KEY, "revenant.io/store": name}, node)
        assert p is not None and p.replicas == () and not p.failover


def test_an_annotation_cannot_add_replicas(tmp_path):
    node = _node(tmp_path, "allow_store_urls = true\n" + CONFIG)
    p = protection_for({**KEY, "revenant.io/store": "s3://main-bucket/ckpt?endpoint=http://127.0.0.1:8333"}, node)
    assert p is not None and p.replicas == () and not p.failover, "a URL annotation gets no replicas"
    with pytest.raises(PolicyError, match="unknown option"):
        protection_for({**KEY, "revenant.io/store": "file:///srv/x?replicas=file:///srv/y"}, node)


@pytest.mark.parametrize(
    ("replicas", "says"),
    [
        ('["nope"]', "neither a URL nor a configured store"),
        ('["file://relative/dir"]', "absolute path"),
        ('["file:///srv/../etc"]', "'..'"),
        ('["s3://B/x"]', "not an S3 bucket name"),
        ('["s3://bucket/x?endpoint=ftp://h"]', "endpoint must be"),
        ('["s3://bucket/x?secret=1"]', "unknown option"),
        ('["oci://user@registry.example/x"]', "credentials stay out of URLs"),
        ('["http://elsewhere/x"]', "not a store URL"),
        ('["main"]', "the store itself"),
        ('["s3://main-bucket/ckpt?endpoint=http://127.0.0.1:8333"]', "the store itself"),
        ('["dr", "file:///srv/dr-store"]', "listed twice"),
        ('"dr"', "expected a list"),
        ("[1]", "expected a list"),
        (str([f"file:///srv/r{i}" for i in range(MAX_REPLICAS + 1)]).replace("'", '"'), f"at most {MAX_REPLICAS}"),
    ],
)
def test_replicas_are_validated_like_primaries(tmp_path, replicas, says):
    text = CONFIG.replace('replicas = ["dr", "oci://registry.example:5000/team/ckpt"]', f"replicas = {replicas}")
    with pytest.raises(PolicyError, match=r"\[stores\.main\] replicas") as e:
        _node(tmp_path, text)
    assert says in str(e.value)


def test_failover_needs_replicas_and_a_boolean(tmp_path):
    with pytest.raises(PolicyError, match="failover: needs replicas"):
        _node(tmp_path, '[stores.default]\nurl = "file:///a"\nfailover = true\n')
    with pytest.raises(PolicyError, match="failover"):
        _node(tmp_path, '[stores.default]\nurl = "file:///a"\nreplicas = ["file:///b"]\nfailover = "maybe"\n')
    node = _node(tmp_path, '[stores.default]\nurl = "file:///a"\nreplicas = ["file:///b"]\n')
    assert node.replicas == {"default": ("file:///b",)} and node.failover == frozenset()
    p = protection_for(KEY, node)
    assert p is not None and p.replicas == ("file:///b",) and not p.failover


def test_replicas_get_the_nodes_key_files_and_registry_credentials(tmp_path):
    node = _node(
        tmp_path,
        CONFIG
        + '[encryption]\nkey_file = "/etc/revenant/new.key"\n[registry]\nauth_file = "/etc/revenant/auth.json"\n',
    )
    file_replica, oci_replica = node.replicas["main"]
    assert file_replica == "file:///srv/dr-store?key_file=/etc/revenant/new.key"
    assert oci_replica.endswith("?key_file=/etc/revenant/new.key&auth_file=/etc/revenant/auth.json")
    assert "auth_file" not in file_replica, "credentials go only to registry URLs"
    node = _node(
        tmp_path,
        CONFIG.replace('"dr", ', '"dr", "az://devstoreaccount1/ckpt/team?endpoint=http://127.0.0.1:10000", ')
        + '[azure]\ncredentials_file = "/etc/revenant/azure.conn"\n',
    )
    az = node.replicas["main"][1]
    assert az.startswith("az://") and az.endswith("&credentials_file=/etc/revenant/azure.conn")
    assert "credentials_file" not in node.replicas["main"][0]
