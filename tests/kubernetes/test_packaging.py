"""packaging/kubernetes: every manifest validates against the Kubernetes API schema (offline, the schemas
ship in kubernetes-validate) for the oldest and newest versions we state; the node installer's containerd
config edit keeps the node's runc handler and adds revenant's, as real containerd 1.6 and 1.7 read it
(`containerd config dump`), is idempotent, refuses what it must not touch, and uninstalls cleanly."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from harness.containerd import CONTAINERD_BIN_DIRS

from .conftest import VERSIONS

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging" / "kubernetes"
FRAGMENTS = REPO / "packaging" / "containerd"
MANIFESTS = sorted(p for p in PACKAGING.rglob("*.yaml"))
KUBERNETES_VERSIONS = ("1.30", "1.34")  # stated in README, "Kubernetes"


def load_node_setup():
    spec = importlib.util.spec_from_file_location("node_setup", PACKAGING / "node_setup.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["node_setup"] = module
    spec.loader.exec_module(module)
    return module


node_setup = load_node_setup()


def test_every_manifest_is_listed():
    names = {str(p.relative_to(PACKAGING)) for p in MANIFESTS}
    assert {
        "namespace.yaml",
        "rbac.yaml",
        "runtimeclass.yaml",
        "node-config.yaml",
        "daemonset.yaml",
        "uninstall.yaml",
        "examples/indexed-job.yaml",
        "examples/statefulset.yaml",
    } <= names, names


@pytest.mark.parametrize("k8s", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: str(p.relative_to(PACKAGING)))
def test_manifest_validates_against_the_api_schema(manifest: Path, k8s: str) -> None:
    import kubernetes_validate

    docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d is not None]
    assert docs, f"{manifest} holds no object"
    for doc in docs:
        kubernetes_validate.validate(doc, k8s, strict=True)  # unknown fields fail too


def test_the_schema_check_can_fail() -> None:
    import kubernetes_validate

    (rc,) = yaml.safe_load_all((PACKAGING / "runtimeclass.yaml").read_text())
    rc["scheduling"]["nodeSelectr"] = rc["scheduling"].pop("nodeSelector")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(rc, KUBERNETES_VERSIONS[0], strict=True)


def test_runtimeclass_schedules_on_the_label_the_installer_sets() -> None:
    (rc,) = yaml.safe_load_all((PACKAGING / "runtimeclass.yaml").read_text())
    assert rc["handler"] == "revenant"
    assert rc["scheduling"]["nodeSelector"] == {node_setup.LABEL: "ready"}


def test_indexed_job_example_key_resolves_to_the_shard() -> None:
    from shim.protect.policy import NodeConfig, protection_for

    (job,) = yaml.safe_load_all((PACKAGING / "examples" / "indexed-job.yaml").read_text())
    annotations = {
        **job["spec"]["template"]["metadata"]["annotations"],
        "batch.kubernetes.io/job-completion-index": "2",
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.sandbox-namespace": job["metadata"]["namespace"],
        "io.kubernetes.cri.sandbox-name": "trainer-2-abcde",
        "io.kubernetes.cri.container-name": "main",
    }
    assert protection_for(annotations, NodeConfig()).key == "ml/trainer/shard-2"


NODE_CONFIG = """version = 2

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
    SystemdCgroup = true
"""


def host_with(tmp_path: Path, config: str) -> Path:
    host = tmp_path / "host"
    (host / "etc" / "containerd").mkdir(parents=True)
    (host / "etc" / "containerd" / "config.toml").write_text(config)
    return host


def dump(version: str, config: Path) -> dict:
    bin_dir = CONTAINERD_BIN_DIRS[version]
    containerd = str(bin_dir / "containerd") if bin_dir else "containerd"
    out = subprocess.run(
        [containerd, "--config", str(config), "config", "dump"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return tomllib.loads(out.stdout)


@pytest.mark.parametrize("version", VERSIONS)
def test_installer_adds_the_handler_and_keeps_runc(version: str, tmp_path: Path) -> None:
    host = host_with(tmp_path, NODE_CONFIG)
    config = host / "etc" / "containerd" / "config.toml"
    assert node_setup.register_handler(host, FRAGMENTS) is True
    cri = dump(version, config)["plugins"]["io.containerd.grpc.v1.cri"]
    runtimes = cri["containerd"]["runtimes"]
    assert runtimes["runc"]["options"]["SystemdCgroup"] is True, "the node's runc handler was changed"
    assert runtimes["revenant"]["runtime_type"] == "io.containerd.revenant.v1"
    assert "batch.kubernetes.io/job-completion-index" in runtimes["revenant"]["pod_annotations"]
    assert cri["sandbox_image"] == "registry.k8s.io/pause:3.9", "the CRI plugin's settings were replaced"
    # Idempotent: a second install changes nothing (so containerd is not restarted again).
    text = config.read_text()
    assert node_setup.register_handler(host, FRAGMENTS) is False
    assert config.read_text() == text
    # Uninstall gives back the node's own file, byte for byte.
    assert node_setup.unregister_handler(host) is True
    assert config.read_text() == NODE_CONFIG
    assert "revenant" not in dump(version, config)["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
    assert node_setup.unregister_handler(host) is False


def test_installer_replaces_an_older_block(tmp_path: Path) -> None:
    old = node_setup.with_fragment_v2(
        NODE_CONFIG,
        '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.revenant]\n  runtime_type = "x"\n',
        "x",
    )
    host = host_with(tmp_path, old)
    assert node_setup.register_handler(host, FRAGMENTS) is True
    text = (host / "etc" / "containerd" / "config.toml").read_text()
    assert text.count(node_setup.BEGIN) == 1 and "job-completion-index" in text


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ('[plugins.cri]\n  sandbox_image = "x"\n', "config version 1"),
        (
            NODE_CONFIG
            + '\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.revenant]\n  runtime_type = "x"\n',
            "already defines",
        ),
        ("version = 2\n[plugins\n", "not valid TOML"),
        ("version = 3\n", "no imports of /etc/containerd/conf.d"),
    ],
)
def test_installer_refuses_what_it_must_not_touch(config: str, reason: str, tmp_path: Path) -> None:
    host = host_with(tmp_path, config)
    with pytest.raises(node_setup.SetupError, match=reason):
        node_setup.register_handler(host, FRAGMENTS)
    assert (host / "etc" / "containerd" / "config.toml").read_text() == config, "a refused install wrote"


def test_installer_without_a_config_file_refuses(tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    with pytest.raises(node_setup.SetupError, match="does not exist"):
        node_setup.register_handler(host, FRAGMENTS)


def test_installer_puts_the_v3_dropin_for_containerd_2(tmp_path: Path) -> None:
    host = host_with(tmp_path, 'version = 3\nimports = ["/etc/containerd/conf.d/*.toml"]\n')
    assert node_setup.register_handler(host, FRAGMENTS) is True
    dropin = host / node_setup.V3_DROPIN
    doc = tomllib.loads(dropin.read_text())
    revenant = doc["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["revenant"]
    assert revenant["runtime_path"] == "/usr/local/bin/containerd-shim-revenant-v1"
    assert node_setup.register_handler(host, FRAGMENTS) is False
    assert node_setup.unregister_handler(host) is True and not dropin.exists()


def test_install_tree_copies_and_links(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "venv" / "bin").mkdir(parents=True)
    (tree / "venv" / "bin" / "revenant").write_text("new\n")
    host = tmp_path / "host"
    (host / "opt" / "revenant").mkdir(parents=True)
    (host / "opt" / "revenant" / "stale").write_text("old\n")
    node_setup.install_tree(host, tree)
    node_setup.install_tree(host, tree)  # again: same result
    assert (host / "opt" / "revenant" / "venv" / "bin" / "revenant").read_text() == "new\n"
    assert not (host / "opt" / "revenant" / "stale").exists()
    for name in node_setup.LINKS:
        assert (host / "usr" / "local" / "bin" / name).readlink() == Path(f"/opt/revenant/venv/bin/{name}")
    assert sorted(p.name for p in (host / "opt").iterdir()) == ["revenant"], "leftover staging trees"
