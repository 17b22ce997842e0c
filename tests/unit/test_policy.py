"""Protection policy from annotations and node config: defaults, Kubernetes keys, and clear errors."""

from __future__ import annotations

import re

import pytest

from shim.protect.policy import (
    DEFAULT_STORE,
    NodeConfig,
    PolicyError,
    parse_duration,
    protection_for,
)

CRI = {
    "io.kubernetes.cri.container-type": "container",
    "io.kubernetes.cri.sandbox-namespace": "ml",
    "io.kubernetes.cri.sandbox-name": "trainer-0",
    "io.kubernetes.cri.container-name": "main",
}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("10m", 600), ("1h30m", 5400), ("250ms", 0.25), ("off", 0), ("0", 0), ("1.5h", 5400)],
)
def test_durations(text, seconds):
    assert parse_duration(text, "x") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "ten minutes", "10x", "m10", "10m junk", "-5s"])
def test_bad_durations_name_the_annotation(text):
    with pytest.raises(PolicyError, match=r"revenant\.io/checkpoint-interval"):
        protection_for({"revenant.io/checkpoint-key": "k", "revenant.io/checkpoint-interval": text}, NodeConfig())


def test_no_key_means_unprotected():
    assert protection_for({}, NodeConfig()) is None
    # The pod sandbox (pause container) is never protected.
    assert protection_for({**CRI, "io.kubernetes.cri.container-type": "sandbox"}, NodeConfig()) is None


def test_pod_key_annotation_skips_the_sandbox():
    """CRI copies the pod's revenant.io/* annotations to the pause container too: only the app
    container may claim the key (else the two would checkpoint into one key)."""
    pod = {"revenant.io/checkpoint-key": "ml/trainer-0", "revenant.io/checkpoint-interval": "1m"}
    assert protection_for({**CRI, **pod, "io.kubernetes.cri.container-type": "sandbox"}, NodeConfig()) is None
    p = protection_for({**CRI, **pod}, NodeConfig())
    assert p is not None and p.key == "ml/trainer-0"


def test_kubernetes_key_and_node_defaults():
    p = protection_for(CRI, NodeConfig())
    assert p is not None
    assert (p.key, p.store, p.interval_s, p.checkpoint_on_stop, p.keep) == (
        "ml/trainer-0/main",
        DEFAULT_STORE,
        0.0,
        False,
        3,
    )


def test_annotations_override_node_config(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        'store = "s3://bucket/ckpt?endpoint=http://127.0.0.1:8333"\ncheckpoint_interval = "5m"\n'
        "keep = 5\ncheckpoint_on_stop = true\n"
    )
    node = NodeConfig.load(cfg)
    assert node.checkpoint_interval_s == 300 and node.keep == 5 and node.checkpoint_on_stop
    p = protection_for(
        {
            **CRI,
            "revenant.io/checkpoint-key": "ml/team/job",
            "revenant.io/keep": "2",
            "revenant.io/checkpoint-on-stop": "false",
            "revenant.io/store": "file:///srv/ckpt",
        },
        node,
    )
    assert p is not None
    assert (p.key, p.store, p.interval_s, p.checkpoint_on_stop, p.keep) == (
        "ml/team/job",
        "file:///srv/ckpt",
        300,
        False,
        2,
    )


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        ("revenant.io/keep", "0"),
        ("revenant.io/keep", "three"),
        ("revenant.io/checkpoint-on-stop", "maybe"),
        ("revenant.io/store", "ftp://x"),
        ("revenant.io/checkpoint-key", "../escape"),
        ("revenant.io/checkpoint-key", "a key with spaces"),
    ],
)
def test_bad_values_are_errors_not_defaults(annotation, value):
    annotations = {"revenant.io/checkpoint-key": "k", annotation: value}
    with pytest.raises(PolicyError, match=annotation.replace(".", r"\.")):
        protection_for(annotations, NodeConfig())


def test_bad_node_config_is_named(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text("keep = 0\n")
    with pytest.raises(PolicyError, match="keep"):
        NodeConfig.load(cfg)
    cfg.write_text("stor = 'file:///x'\n")
    with pytest.raises(PolicyError, match="unknown setting"):
        NodeConfig.load(cfg)
    cfg.write_text("keep = [\n")
    with pytest.raises(PolicyError, match=re.escape(str(cfg))):
        NodeConfig.load(cfg)
    assert NodeConfig.load(tmp_path / "absent.toml") == NodeConfig()


INDEXED_POD = {**CRI, "batch.kubernetes.io/job-completion-index": "3"}


def test_key_template_substitutes_index_namespace_and_container():
    annotations = {**INDEXED_POD, "revenant.io/checkpoint-key": "${namespace}/trainer/shard-${job-completion-index}"}
    assert protection_for(annotations, NodeConfig()).key == "ml/trainer/shard-3"
    annotations["revenant.io/checkpoint-key"] = "${namespace}/${container}-${job-completion-index}"
    assert protection_for(annotations, NodeConfig()).key == "ml/main-3"


def test_key_without_substitution_is_kept_as_written():
    assert protection_for({**CRI, "revenant.io/checkpoint-key": "ml/fixed"}, NodeConfig()).key == "ml/fixed"


@pytest.mark.parametrize(
    ("template", "annotations", "reason"),
    [
        ("ml/${pod}", INDEXED_POD, r"unknown substitution \$\{pod\}"),
        ("ml/${}", INDEXED_POD, r"unknown substitution \$\{\}"),
        ("ml/shard-${job-completion-index}", CRI, r"no batch\.kubernetes\.io/job-completion-index annotation"),
        ("${namespace}/x", {"io.kubernetes.cri.container-type": "container"}, r"\$\{namespace\} .* has no value"),
        ("ml/$job", INDEXED_POD, r"'\$' may only start"),
        ("ml/${job-completion-index", INDEXED_POD, r"'\$' may only start"),
        (
            "ml/shard-${job-completion-index}",
            {**CRI, "batch.kubernetes.io/job-completion-index": "../1"},
            r"is not a valid value",
        ),
        (
            "ml/shard-${job-completion-index}",
            {**CRI, "batch.kubernetes.io/job-completion-index": "-1"},
            r"is not a valid value",
        ),
    ],
)
def test_unresolvable_key_template_fails_with_the_reason(template, annotations, reason):
    with pytest.raises(PolicyError, match=reason):
        protection_for({**annotations, "revenant.io/checkpoint-key": template}, NodeConfig())


def test_a_pods_key_stays_under_its_namespace():
    with pytest.raises(PolicyError, match=r"'team/job' is outside the pod's namespace: a pod in 'ml' may only"):
        protection_for({**CRI, "revenant.io/checkpoint-key": "team/job"}, NodeConfig())
    with pytest.raises(PolicyError, match="outside the pod's namespace"):  # a prefix is not a namespace
        protection_for({**CRI, "revenant.io/checkpoint-key": "mlx/job"}, NodeConfig())
    assert protection_for({**CRI, "revenant.io/checkpoint-key": "ml/team/job"}, NodeConfig()).key == "ml/team/job"
    # Not a CRI container (ctr, Docker): not confined.
    assert protection_for({"revenant.io/checkpoint-key": "team/job"}, NodeConfig()).key == "team/job"


def test_node_encryption_keys_reach_every_store_url(tmp_path):
    import os

    from shim.store import KeyMismatch, open_store

    keys = []
    for name in ("new.key", "old.key"):
        fd = os.open(tmp_path / name, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, os.urandom(32))
        os.close(fd)
        keys.append(str(tmp_path / name))
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f"store = 'file://{tmp_path}/store'\n[encryption]\nkey_file = '{keys[0]}'\nold_key_files = ['{keys[1]}']\n"
    )
    node = NodeConfig.load(cfg)
    assert node.encryption_key_files == tuple(keys)
    default = protection_for(CRI, node)
    annotated = protection_for({**CRI, "revenant.io/store": f"file://{tmp_path}/other?packs=0"}, node)
    for p in (default, annotated):
        store = open_store(p.store)
        assert [k.source for k in store.keyring.keys] == keys
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"data")
    open_store(default.store).put("k", tmp_path / "src")
    with pytest.raises(KeyMismatch):
        open_store(f"file://{tmp_path}/store").get("k", tmp_path / "out")
    # A pod may not choose key files (any 0600 file of root's on the node would do as a key).
    for url in (f"file:///x?key_file={keys[0]}", "s3://b/p?endpoint=http://h&allow_plaintext=1"):
        with pytest.raises(PolicyError, match="node configuration"):
            protection_for({**CRI, "revenant.io/store": url}, node)
    for bad in ("[encryption]\nkey_files = '/k'\n", "[encryption]\nkey_file = 'relative'\n", "encryption = 1\n"):
        cfg.write_text(bad)
        with pytest.raises(PolicyError, match="encryption"):
            NodeConfig.load(cfg)
