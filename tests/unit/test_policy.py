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
            "revenant.io/checkpoint-key": "team/job",
            "revenant.io/keep": "2",
            "revenant.io/checkpoint-on-stop": "false",
            "revenant.io/store": "file:///srv/ckpt",
        },
        node,
    )
    assert p is not None
    assert (p.key, p.store, p.interval_s, p.checkpoint_on_stop, p.keep) == (
        "team/job",
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
