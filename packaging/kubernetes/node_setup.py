#!/usr/bin/env python3
"""Install or remove revenant on a Kubernetes node, from the privileged DaemonSet's containers.

The host's root is mounted at HOST_ROOT (default /host). `install`:
  1. copies the self-contained tree (/opt/revenant: a relocatable CPython and a virtualenv with the
     revenant wheel) from the image onto the host, and links the shim and CLI into /usr/local/bin;
  2. registers the `revenant` CRI runtime handler with containerd: on 1.6/1.7 (config version 2) the
     v2 fragment goes between marker lines at the end of config.toml (1.6/1.7 replace an imported plugin
     section instead of merging it, so an `imports` drop-in would wipe the node's other runtimes); on
     2.x (version 3) the v3 drop-in goes into conf.d. The result is parsed before it is written;
  3. restarts containerd through the host's PID 1 namespaces, only if the configuration changed
     (running containers survive: their shims are separate processes);
  4. labels the node `revenant.io/runtime=ready` (the RuntimeClass schedules on that label).
`uninstall` undoes 2-4 (the tree stays while shims may still run from it: `--remove-tree` deletes it).
`unlabel` only removes the label (the DaemonSet's preStop: no new revenant pods while its agent is gone).

Standard library only: it runs before anything else is known to work on the node.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

log = logging.getLogger("revenant-node-setup")

BEGIN = "# BEGIN revenant CRI runtime handler (managed by revenant's node installer; do not edit)"
END = "# END revenant CRI runtime handler"
V2_TABLE = ("plugins", "io.containerd.grpc.v1.cri", "containerd", "runtimes", "revenant")
V3_TABLE = ("plugins", "io.containerd.cri.v1.runtime", "containerd", "runtimes", "revenant")
V3_DROPIN = "etc/containerd/conf.d/revenant-cri.toml"
LABEL = "revenant.io/runtime"
LINKS = ("containerd-shim-revenant-v1", "revenant")
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class SetupError(Exception):
    """The node is not in a state the installer may change; the message says what to do."""


def _has_table(doc: dict, path: tuple[str, ...]) -> bool:
    for part in path:
        if not isinstance(doc, dict) or part not in doc:
            return False
        doc = doc[part]
    return True


def _parse(text: str, where: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SetupError(f"{where} is not valid TOML ({e}); fix it before installing revenant") from None


def strip_managed(text: str) -> str:
    """The config without the installer's block (and without the blank line it added before it)."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    skipping = False
    for line in lines:
        if line.rstrip("\n") == BEGIN:
            skipping = True
            if out and out[-1].strip() == "":
                out.pop()
            continue
        if skipping:
            if line.rstrip("\n") == END:
                skipping = False
            continue
        out.append(line)
    if skipping:
        raise SetupError(f"the config has {BEGIN!r} without {END!r}: restore the file or remove the line")
    return "".join(out)


def with_fragment_v2(text: str, fragment: str, where: str) -> str:
    """config.toml (version 2) with the v2 fragment in the managed block at its end; idempotent."""
    base = strip_managed(text)
    doc = _parse(base, where)
    version = doc.get("version", 1)
    if version != 2:
        raise SetupError(
            f"{where} is config version {version}: revenant's handler is written for version 2 "
            "(containerd 1.6/1.7; `containerd config migrate` converts a version 1 file) or version 3 (2.x)"
        )
    if _has_table(doc, V2_TABLE):
        raise SetupError(f"{where} already defines [{'.'.join(V2_TABLE)}] outside the installer's block: remove it")
    managed = f"{BEGIN}\n{fragment.rstrip()}\n{END}\n"
    result = base.rstrip("\n") + "\n\n" + managed if base.strip() else managed
    doc = _parse(result, f"{where} with revenant's handler")
    if not _has_table(doc, V2_TABLE):
        raise SetupError("the v2 fragment does not define the revenant runtime table")
    return result


def config_version(config: Path) -> int:
    if not config.exists():
        raise SetupError(
            f"{config} does not exist: containerd runs on built-in defaults, and a file holding only "
            "revenant's table would drop them; write the defaults first (`containerd config default`)"
        )
    return int(_parse(config.read_text(), str(config)).get("version", 1))


def register_handler(host: Path, fragments: Path) -> bool:
    """Add the runtime handler to the host's containerd config; True when a file changed."""
    config = host / "etc/containerd/config.toml"
    version = config_version(config)
    if version == 3:
        doc = _parse(config.read_text(), str(config))
        imports = doc.get("imports", [])
        if not any(str(i).startswith("/etc/containerd/conf.d/") for i in imports):
            raise SetupError(f"{config} has no imports of /etc/containerd/conf.d/*.toml: add it, then re-run")
        dropin = host / V3_DROPIN
        text = (fragments / "revenant-cri-v3.toml").read_text()
        _parse(text, "revenant-cri-v3.toml")
        if dropin.exists() and dropin.read_text() == text:
            return False
        _write_atomic(dropin, text)
        return True
    current = config.read_text()
    wanted = with_fragment_v2(current, (fragments / "revenant-cri-v2.toml").read_text(), str(config))
    if wanted == current:
        return False
    _write_atomic(config, wanted)
    return True


def unregister_handler(host: Path) -> bool:
    changed = False
    dropin = host / V3_DROPIN
    if dropin.exists():
        dropin.unlink()
        changed = True
    config = host / "etc/containerd/config.toml"
    if config.exists():
        current = config.read_text()
        stripped = strip_managed(current)
        if stripped != current:
            _parse(stripped, str(config))
            _write_atomic(config, stripped)
            changed = True
    return changed


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.revenant-tmp")
    tmp.write_text(text)
    if path.exists():
        shutil.copymode(path, tmp)
    os.replace(tmp, path)


def install_tree(host: Path, source: Path) -> None:
    """Copy /opt/revenant into the host (a new tree beside the old one, then swapped in) and link it."""
    dest = host / "opt/revenant"
    staging = host / "opt/.revenant-new"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, symlinks=True)
    if dest.exists():
        old = host / "opt/.revenant-old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)  # running shims keep their open files; new ones start from the new tree
        os.replace(staging, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, dest)
    bin_dir = host / "usr/local/bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in LINKS:
        link = bin_dir / name
        target = f"/opt/revenant/venv/bin/{name}"
        if link.is_symlink() and os.readlink(link) == target:
            continue
        tmp = bin_dir / f".{name}.revenant-tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, link)


def install_node_config(host: Path, source: Path) -> None:
    """Write /etc/revenant/config.toml from the DaemonSet's ConfigMap (checked as TOML first)."""
    text = source.read_text()
    _parse(text, str(source))
    target = host / "etc/revenant/config.toml"
    if not target.exists() or target.read_text() != text:
        _write_atomic(target, text)


def running_shims(proc: Path = Path("/proc")) -> list[int]:
    """PIDs of revenant shims (the container shares the host's PID namespace)."""
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"containerd-shim-revenant-v1") for a in argv[:2]):
            pids.append(int(entry.name))
    return pids


def restart_containerd() -> None:
    """`systemctl restart containerd` in the host's namespaces (the container runs with hostPID)."""
    cmd = ["nsenter", "-t", "1", "-m", "-u", "-i", "-n", "-p", "--", "systemctl", "restart", "containerd"]
    subprocess.run(cmd, check=True, timeout=120)
    active = ["nsenter", "-t", "1", "-m", "-u", "-i", "-n", "-p", "--", "systemctl", "is-active", "containerd"]
    for _ in range(60):
        if subprocess.run(active, capture_output=True, timeout=30).returncode == 0:
            return
        time.sleep(1)
    raise SetupError("containerd did not come back after the restart: see `journalctl -u containerd` on the node")


def label_node(node: str, value: str | None) -> None:
    """Set (value) or remove (None) the node's revenant label through the API server (merge patch)."""
    host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
    token = (SERVICE_ACCOUNT / "token").read_text().strip()
    ctx = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt"))
    body = json.dumps({"metadata": {"labels": {LABEL: value}}}).encode()
    req = urllib.request.Request(
        f"https://{host}:{port}/api/v1/nodes/{node}",
        data=body,
        method="PATCH",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/merge-patch+json"},
    )
    with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
        resp.read()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["install", "uninstall", "unlabel"])
    ap.add_argument("--host-root", type=Path, default=Path(os.environ.get("HOST_ROOT", "/host")))
    ap.add_argument("--tree", type=Path, default=Path("/opt/revenant"), help="the tree to copy onto the host")
    ap.add_argument("--fragments", type=Path, default=Path("/opt/revenant/share/containerd"))
    ap.add_argument("--node", default=os.environ.get("NODE_NAME", ""), help="this node's name (downward API)")
    ap.add_argument("--no-restart", action="store_true", help="do not restart containerd (print whether needed)")
    ap.add_argument("--no-label", action="store_true", help="leave the node's labels alone")
    ap.add_argument("--remove-tree", action="store_true", help="uninstall: also delete /opt/revenant")
    ap.add_argument("--node-config", type=Path, help="install: the node config to write to /etc/revenant")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.action == "unlabel":
            if not args.no_label:
                label_node(args.node, None)
            return 0
        if args.action == "install":
            install_tree(args.host_root, args.tree)
            if args.node_config is not None:
                install_node_config(args.host_root, args.node_config)
            changed = register_handler(args.host_root, args.fragments)
        else:
            shims = running_shims()
            if shims:
                raise SetupError(
                    f"{len(shims)} revenant shim(s) still run (pids {', '.join(map(str, shims[:10]))}): delete "
                    "the pods with runtimeClassName revenant on this node first; containerd needs the shim "
                    "binary to clean them up"
                )
            changed = unregister_handler(args.host_root)
            for name in LINKS:
                (args.host_root / "usr/local/bin" / name).unlink(missing_ok=True)
            if args.remove_tree:
                shutil.rmtree(args.host_root / "opt/revenant", ignore_errors=True)
        log.info("containerd config %s", "changed" if changed else "unchanged")
        if changed and not args.no_restart:
            restart_containerd()
        if not args.no_label:
            label_node(args.node, "ready" if args.action == "install" else None)
        print(json.dumps({"action": args.action, "config_changed": changed}))
        return 0
    except (SetupError, OSError, subprocess.SubprocessError, KeyError) as e:
        log.error("%s failed: %s", args.action, e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
