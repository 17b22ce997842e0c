"""Protection policy from annotations and node config: defaults, Kubernetes keys, and clear errors."""

from __future__ import annotations

import re

import pytest

from shim.protect.policy import (
    DEFAULT_STORE,
    DEFAULT_STREAM_BUDGET_MIB,
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
        'keep = 5\ncheckpoint_on_stop = true\n[stores.srv]\nurl = "file:///srv/ckpt"\n'
    )
    node = NodeConfig.load(cfg)
    assert node.checkpoint_interval_s == 300 and node.keep == 5 and node.checkpoint_on_stop
    p = protection_for(
        {
            **CRI,
            "revenant.io/checkpoint-key": "ml/team/job",
            "revenant.io/keep": "2",
            "revenant.io/checkpoint-on-stop": "false",
            "revenant.io/store": "srv",
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


# -- tenancy: the node's owner decides where checkpoints go, the workload only picks among them ------


def _node(tmp_path, text: str) -> NodeConfig:
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    return NodeConfig.load(cfg)


NAMED = """
default_store = "team"
[stores.team]
url = "s3://team-bucket/ckpt?endpoint=http://10.0.0.5:8333"
[stores.scratch]
url = "file:///var/lib/revenant/scratch-store"
"""


def test_named_stores_and_the_default(tmp_path):
    node = _node(tmp_path, NAMED)
    assert node.store == "s3://team-bucket/ckpt?endpoint=http://10.0.0.5:8333"
    p = protection_for({"revenant.io/checkpoint-key": "k"}, node)
    assert p is not None and p.store == node.store
    p = protection_for({"revenant.io/checkpoint-key": "k", "revenant.io/store": "scratch"}, node)
    assert p is not None and p.store == "file:///var/lib/revenant/scratch-store"


def test_the_single_store_setting_is_the_default_store(tmp_path):
    node = _node(tmp_path, 'store = "file:///srv/ckpt"\n')
    assert node.store == "file:///srv/ckpt" and dict(node.stores) == {"default": "file:///srv/ckpt"}
    p = protection_for({"revenant.io/checkpoint-key": "k", "revenant.io/store": "default"}, node)
    assert p is not None and p.store == "file:///srv/ckpt"


@pytest.mark.parametrize(
    "url",
    [
        "file:///",  # the whole host filesystem
        "file:///var/lib/kubelet/pods/other-tenant/volumes",
        "s3://team-bucket/ckpt?endpoint=http://attacker.example:80",  # the node's credentials, elsewhere
        "oci://registry.attacker.example/loot",
    ],
)
def test_a_url_in_the_annotation_is_refused_unless_the_node_allows_urls(tmp_path, url):
    node = _node(tmp_path, NAMED)
    with pytest.raises(PolicyError, match=r"revenant\.io/store: .* is a URL.*allow_store_urls") as e:
        protection_for({"revenant.io/checkpoint-key": "k", "revenant.io/store": url}, node)
    assert "scratch, team" in str(e.value)  # says which names would do
    open_node = _node(tmp_path, "allow_store_urls = true\n" + NAMED)
    p = protection_for({"revenant.io/checkpoint-key": "k", "revenant.io/store": url}, open_node)
    assert p is not None and p.store == url


def test_an_unknown_store_name_is_refused(tmp_path):
    with pytest.raises(PolicyError, match=r"revenant\.io/store: this node has no store named 'other'"):
        protection_for({"revenant.io/checkpoint-key": "k", "revenant.io/store": "other"}, _node(tmp_path, NAMED))


def test_bad_store_tables_are_named(tmp_path):
    with pytest.raises(PolicyError, match=r"default_store: no \[stores\.nope\]"):
        _node(tmp_path, 'default_store = "nope"\n')
    with pytest.raises(PolicyError, match="both define the default store"):
        _node(tmp_path, 'store = "file:///a"\n[stores.default]\nurl = "file:///b"\n')
    with pytest.raises(PolicyError, match=r"\[stores\.x\].*expected url = .* optionally replicas"):
        _node(tmp_path, '[stores.x]\nurl = "file:///a"\nsecret = 1\n')
    with pytest.raises(PolicyError, match=r"\[stores\.x\] url"):
        _node(tmp_path, '[stores.x]\nurl = "file://relative/dir"\n')


POD = {**CRI, "revenant.io/checkpoint-key": "ml/trainer/main"}


def test_a_pods_key_stays_in_its_namespace(tmp_path):
    p = protection_for(POD, NodeConfig())
    assert p is not None and p.key == "ml/trainer/main"
    for other in ("prod/payments/main", "mlx/trainer", "ml"):
        with pytest.raises(PolicyError, match=r"revenant\.io/checkpoint-key: .* outside the pod's namespace.*'ml/'"):
            protection_for({**POD, "revenant.io/checkpoint-key": other}, NodeConfig())
    # The io.kubernetes.pod.namespace form alone marks a pod's container too.
    with pytest.raises(PolicyError, match="outside the pod's namespace"):
        protection_for({"io.kubernetes.pod.namespace": "ml", "revenant.io/checkpoint-key": "prod/x"}, NodeConfig())


def test_a_pod_cannot_claim_another_namespace(tmp_path):
    spoofed = {**POD, "io.kubernetes.pod.namespace": "prod", "revenant.io/checkpoint-key": "prod/payments/main"}
    with pytest.raises(PolicyError, match="namespace annotations disagree"):
        protection_for(spoofed, NodeConfig())


def test_the_node_config_widens_key_confinement_deliberately(tmp_path):
    other = {**POD, "revenant.io/checkpoint-key": "prod/payments/main"}
    wide = _node(tmp_path, "[tenancy]\nallow_cross_namespace_keys = true\n")
    assert protection_for(other, wide) is not None
    listed = _node(tmp_path, '[tenancy]\nany_key_namespaces = ["ml"]\n')
    assert protection_for(other, listed) is not None
    with pytest.raises(PolicyError, match="outside the pod's namespace"):
        protection_for({**other, "io.kubernetes.cri.sandbox-namespace": "dev"}, listed)


def test_containers_outside_kubernetes_may_name_any_key():
    p = protection_for({"revenant.io/checkpoint-key": "prod/payments/main"}, NodeConfig())
    assert p is not None and p.key == "prod/payments/main"


@pytest.mark.parametrize("key", ["a//b", "a/./b", "./a", "a/"])
def test_keys_with_empty_or_dot_parts_are_refused(key):
    with pytest.raises(PolicyError, match=r"revenant\.io/checkpoint-key"):
        protection_for({"revenant.io/checkpoint-key": key}, NodeConfig())


# -- bounds -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("1ms", "outside the allowed range 10s .. 30d"),
        ("9s", "outside the allowed range"),
        ("100000000000h", "outside the allowed range"),
        ("31d", "not a duration"),  # no day unit: Go durations stop at hours
        ("0s", "write 'off'"),
        ("0", "write 'off'"),
        ("9" * 400 + "h", "not a duration"),
    ],
)
def test_intervals_are_bounded(text, says):
    with pytest.raises(PolicyError, match=r"revenant\.io/checkpoint-interval: .*" + re.escape(says)):
        protection_for({"revenant.io/checkpoint-key": "k", "revenant.io/checkpoint-interval": text}, NodeConfig())


def test_interval_bounds_and_off(tmp_path):
    for text, seconds in (("off", 0), ("never", 0), ("10s", 10), ("720h", 30 * 86400)):
        p = protection_for({"revenant.io/checkpoint-key": "k", "revenant.io/checkpoint-interval": text}, NodeConfig())
        assert p is not None and p.interval_s == seconds
    node = _node(tmp_path, 'min_checkpoint_interval = "1s"\n')
    p = protection_for({"revenant.io/checkpoint-key": "k", "revenant.io/checkpoint-interval": "2s"}, node)
    assert p is not None and p.interval_s == 2
    with pytest.raises(PolicyError, match="checkpoint_interval"):
        _node(tmp_path, 'checkpoint_interval = "1ms"\n')
    with pytest.raises(PolicyError, match="stop_deadline"):
        _node(tmp_path, 'stop_deadline = "100000000000h"\n')


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("file://relative/dir", "absolute path"),
        ("file:///srv/../etc", "'..'"),
        ("file:///srv?packs=maybe", "packs"),
        ("file:///srv?pack=0", "unknown option"),
        ("s3://b?endpoint=http://127.0.0.1:8333&endpoint=http://10.1.1.1", "more than once"),
        ("s3://bucket/p?multipart_mb=inf", "multipart_mb"),
        ("s3://bucket/p?multipart_mb=0", "multipart_mb"),
        ("s3://bucket/p?multipart_mb=nan", "multipart_mb"),
        ("s3://bucket/p?pack_mb=0", "pack_mb"),
        ("s3://bucket/p?pack_mb=257", "pack_mb"),
        ("s3://bucket/p?pack_mb=1.5", "pack_mb"),
        ("s3://bucket/p?packs=maybe", "packs"),
        ("s3://bucket/p?endpoint=file:///etc", "endpoint"),
        ("s3://Bad_Bucket/p", "bucket"),
        ("s3://user:secret@bucket/p", "user@"),
        ("oci://127.0.0.1:5000/repo?chunked_mb=0", "chunked_mb"),
        ("oci://127.0.0.1:5000/repo?chunked_mb=1e9", "chunked_mb"),
        ("oci://127.0.0.1:5000", "REPOSITORY"),
    ],
)
def test_store_url_options_are_checked_at_create(url, says):
    node = NodeConfig(allow_store_urls=True)
    with pytest.raises(PolicyError, match=re.escape(says)):
        protection_for({"revenant.io/checkpoint-key": "k", "revenant.io/store": url}, node)


@pytest.mark.parametrize(
    "url",
    [
        "file:///srv/ckpt?packs=0",
        "s3://revenant-test/t-1?endpoint=http://127.0.0.1:8333&region=eu-west-1&multipart_mb=16",
        "s3://revenant-test/t-1?endpoint=http://127.0.0.1:8333&pack_mb=64&packs=1",
        "oci://127.0.0.1:5000/revenant-test-1?insecure=1&chunked_mb=4&mount_from=a/b,c",
    ],
)
def test_good_store_urls_pass(url):
    p = protection_for({"revenant.io/checkpoint-key": "k", "revenant.io/store": url}, NodeConfig(allow_store_urls=True))
    assert p is not None and p.store == url


def test_periodic_checkpoints_refuse_an_interval_their_thread_cannot_wait() -> None:
    from shim.protect.periodic import PeriodicCheckpoints

    for interval in (0, -1, 100000000000 * 3600.0):
        with pytest.raises(ValueError, match="interval must be positive and at most"):
            PeriodicCheckpoints("ns/c", interval, lambda: None)


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
        "allow_store_urls = true\n"
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


def test_pack_size_bound_matches_the_store() -> None:
    from shim.protect import policy
    from shim.store.limits import MAX_PACK_MB

    assert policy._MAX_PACK_MB == MAX_PACK_MB


@pytest.mark.parametrize(
    "text, budget",
    [("", DEFAULT_STREAM_BUDGET_MIB), ("stream_budget_mib = 0\n", 0), ("stream_budget_mib = 64\n", 64)],
)
def test_stream_budget(tmp_path, text, budget):
    assert _node(tmp_path, text).stream_budget_mib == budget


@pytest.mark.parametrize("value", ["8", "-1", "'64'", "64.5", "true", "2000000"])
def test_bad_stream_budgets_are_named(tmp_path, value):
    with pytest.raises(PolicyError, match="stream_budget_mib"):
        _node(tmp_path, f"stream_budget_mib = {value}\n")


@pytest.mark.parametrize(
    "text, lazy", [("", False), ("lazy_restore = true\n", True), ("lazy_restore = false\n", False)]
)
def test_lazy_restore(tmp_path, text, lazy):
    assert _node(tmp_path, text).lazy_restore is lazy


@pytest.mark.parametrize("value", ["'maybe'", "2", "'yes please'"])
def test_a_bad_lazy_restore_is_named(tmp_path, value):
    with pytest.raises(PolicyError, match="lazy_restore"):
        _node(tmp_path, f"lazy_restore = {value}\n")
