"""Which containers revenant protects, and how: OCI annotations over node defaults.

Annotations (set by `ctr run --annotation`, Docker `--annotation`, or Kubernetes pod annotations
passed through CRI) win over `/etc/revenant/config.toml`. A bad value is an error at Create, never a
silent default: a job its owner believes protected must not run unprotected.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

KEY = "revenant.io/checkpoint-key"
INTERVAL = "revenant.io/checkpoint-interval"
STORE = "revenant.io/store"
ON_STOP = "revenant.io/checkpoint-on-stop"
KEEP = "revenant.io/keep"

CRI_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
CRI_CONTAINER_NAME = "io.kubernetes.cri.container-name"
CRI_POD_NAME = "io.kubernetes.cri.sandbox-name"
CRI_POD_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
# Set by the Job controller on each pod of an Indexed Job (a pod annotation, passed through by the
# CRI handler's pod_annotations in packaging/containerd/).
JOB_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"

DEFAULT_CONFIG_PATH = Path("/etc/revenant/config.toml")
DEFAULT_STORE = "file:///var/lib/revenant/store"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_KEY_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,253}$")
_KEY_VARIABLE = re.compile(r"\$\{([^}]*)\}")
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_INDEX = re.compile(r"^(0|[1-9][0-9]{0,8})$")
# Substitutions in a key template: where each value comes from, and what a valid value looks like.
_KEY_VARIABLES = {
    "namespace": (CRI_POD_NAMESPACE, _DNS_LABEL),
    "container": (CRI_CONTAINER_NAME, _DNS_LABEL),
    "job-completion-index": (JOB_COMPLETION_INDEX, _INDEX),
}


class PolicyError(ValueError):
    """An annotation or config value revenant cannot honour; the message names it."""


def parse_duration(text: str, what: str) -> float:
    """Go-style durations as Kubernetes users write them: `90s`, `10m`, `1h30m`; `0` or `off` = never."""
    value = text.strip()
    if value in ("0", "off", "never"):
        return 0.0
    pos, total = 0, 0.0
    for m in _DURATION.finditer(value):
        if m.start() != pos:
            break
        total += float(m[1]) * _UNIT_S[m[2]]
        pos = m.end()
    if pos != len(value) or pos == 0:
        raise PolicyError(f"{what}: {text!r} is not a duration (examples: 30s, 10m, 1h30m, off)")
    return total


def parse_bool(text: str, what: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise PolicyError(f"{what}: {text!r} is not true or false")


def parse_keep(value: object, what: str) -> int:
    try:
        keep = int(str(value).strip())
    except ValueError:
        raise PolicyError(f"{what}: {value!r} is not a whole number") from None
    if keep < 1:
        raise PolicyError(f"{what}: must keep at least 1 checkpoint, got {keep}")
    return keep


def validate_store_url(url: str, what: str) -> str:
    if not re.match(r"^(file|s3|oci)://.+", url):
        raise PolicyError(f"{what}: {url!r} is not a store URL (file://, s3:// or oci://)")
    return url


@dataclass(frozen=True)
class NodeConfig:
    """Node defaults from /etc/revenant/config.toml (every field optional there)."""

    store: str = DEFAULT_STORE
    checkpoint_interval_s: float = 0.0
    keep: int = 3
    checkpoint_on_stop: bool = False
    stop_deadline_s: float = 60.0
    run_dir: Path = Path("/run/revenant")
    staging_dir: Path = Path("/dev/shm/revenant")
    # [encryption] key_file (seals new checkpoints) then old_key_files (still read): every store URL
    # gets them as `key_file=` (shim.store.open_store), annotation URLs may not name any.
    encryption_key_files: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: Path = DEFAULT_CONFIG_PATH) -> NodeConfig:
        if not path.exists():
            return cls()
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise PolicyError(f"{path}: {e}") from None
        where = str(path)
        known = {
            "store",
            "checkpoint_interval",
            "keep",
            "checkpoint_on_stop",
            "stop_deadline",
            "run_dir",
            "staging_dir",
            "encryption",
        }
        unknown = set(data) - known
        if unknown:
            raise PolicyError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
        cfg = cls()
        if "store" in data:
            cfg = replace(cfg, store=validate_store_url(str(data["store"]), f"{where} store"))
        if "checkpoint_interval" in data:
            cfg = replace(
                cfg,
                checkpoint_interval_s=parse_duration(str(data["checkpoint_interval"]), f"{where} checkpoint_interval"),
            )
        if "keep" in data:
            cfg = replace(cfg, keep=parse_keep(data["keep"], f"{where} keep"))
        if "checkpoint_on_stop" in data:
            cfg = replace(
                cfg, checkpoint_on_stop=parse_bool(str(data["checkpoint_on_stop"]), f"{where} checkpoint_on_stop")
            )
        if "stop_deadline" in data:
            cfg = replace(cfg, stop_deadline_s=parse_duration(str(data["stop_deadline"]), f"{where} stop_deadline"))
        if "run_dir" in data:
            cfg = replace(cfg, run_dir=Path(data["run_dir"]))
        if "staging_dir" in data:
            cfg = replace(cfg, staging_dir=Path(data["staging_dir"]))
        if "encryption" in data:
            cfg = replace(cfg, encryption_key_files=parse_encryption(data["encryption"], f"{where} [encryption]"))
            cfg = replace(cfg, store=with_key_files(cfg.store, cfg.encryption_key_files))
        return cfg


def parse_encryption(table: object, what: str) -> tuple[str, ...]:
    if not isinstance(table, dict) or set(table) - {"key_file", "old_key_files"} or "key_file" not in table:
        raise PolicyError(f'{what}: expected key_file = "/path" and optionally old_key_files = ["/path", ...]')
    old = table.get("old_key_files", [])
    files = [table["key_file"], *(old if isinstance(old, list) else [old])]
    for f in files:
        if not isinstance(f, str) or not f.startswith("/") or "," in f:
            raise PolicyError(f"{what}: key files must be absolute paths without ',': {f!r}")
    return tuple(files)


def with_key_files(url: str, key_files: tuple[str, ...]) -> str:
    """The store URL carrying the node's key files (an annotation URL may not carry its own)."""
    if not key_files:
        return url
    return f"{url}{'&' if '?' in url else '?'}key_file={','.join(key_files)}"


@dataclass(frozen=True)
class Protection:
    """How one container is protected."""

    key: str
    store: str
    interval_s: float
    checkpoint_on_stop: bool
    keep: int


def expand_key_template(template: str, annotations: Mapping[str, str]) -> str:
    """Substitute `${namespace}`, `${container}` and `${job-completion-index}` in a key annotation.

    A Job's replacement pods get new names, so the default key (which names the pod) would not find
    the previous pod's checkpoints; an Indexed Job's completion index is what stays the same. A name
    revenant does not know, or one this container has no (valid) value for, is an error naming it."""
    if "$" not in template:
        return template

    def value(m: re.Match[str]) -> str:
        name = m[1]
        if name not in _KEY_VARIABLES:
            known = ", ".join(f"${{{n}}}" for n in _KEY_VARIABLES)
            raise PolicyError(f"{KEY}: unknown substitution ${{{name}}} in {template!r} (known: {known})")
        source, valid = _KEY_VARIABLES[name]
        found = annotations.get(source, "").strip()
        if not found:
            hint = (
                " (not a pod of an Indexed Job, or the CRI handler does not pass it through)"
                if name == "job-completion-index"
                else " (not a Kubernetes container)"
            )
            raise PolicyError(f"{KEY}: ${{{name}}} in {template!r} has no value: no {source} annotation{hint}")
        if not valid.match(found):
            raise PolicyError(f"{KEY}: ${{{name}}} in {template!r}: {source}={found!r} is not a valid value")
        return found

    key = _KEY_VARIABLE.sub(value, template)
    if "$" in key:
        raise PolicyError(f"{KEY}: {template!r}: '$' may only start a ${{name}} substitution")
    return key


def checkpoint_key(annotations: Mapping[str, str]) -> str | None:
    """The explicit key, else `<namespace>/<pod>/<container>` for a Kubernetes app container.
    A pod's sandbox (pause) container is never protected: CRI passes the pod's `revenant.io/*`
    annotations to it as well, and it must not claim the app container's key."""
    if annotations.get(CRI_CONTAINER_TYPE) == "sandbox":
        return None
    if KEY in annotations:
        key = expand_key_template(annotations[KEY].strip(), annotations)
        if not _KEY_OK.match(key) or ".." in key.split("/"):
            raise PolicyError(f"{KEY}: {key!r} must be 1-254 characters of letters, digits, '.', '_', '-', '/'")
        return key
    if annotations.get(CRI_CONTAINER_TYPE) == "container":
        parts = [annotations.get(k, "") for k in (CRI_POD_NAMESPACE, CRI_POD_NAME, CRI_CONTAINER_NAME)]
        if all(parts):
            return "/".join(parts)
    return None


def confine_key(key: str, annotations: Mapping[str, str]) -> str:
    """A Kubernetes pod's key must sit under `<its namespace>/`: a pod must not resume (or overwrite)
    another namespace's checkpoints by naming their key. containerd's CRI plugin sets the namespace
    annotation itself; containers it did not create (ctr, Docker) are not confined, as whoever calls
    containerd's API directly is root on the node already."""
    namespace = annotations.get(CRI_POD_NAMESPACE, "").strip()
    if not namespace or key.startswith(f"{namespace}/"):
        return key
    raise PolicyError(
        f"{KEY}: {key!r} is outside the pod's namespace: a pod in {namespace!r} may only use keys "
        f"starting with '{namespace}/' (write templates as '${{namespace}}/...')"
    )


def protection_for(annotations: Mapping[str, str], node: NodeConfig) -> Protection | None:
    """The container's protection, or None when it has no checkpoint key (then revenant leaves it alone)."""
    key = checkpoint_key(annotations)
    if key is None:
        return None
    key = confine_key(key, annotations)
    interval = node.checkpoint_interval_s
    if INTERVAL in annotations:
        interval = parse_duration(annotations[INTERVAL], INTERVAL)
    if STORE in annotations:
        store = validate_store_url(annotations[STORE].strip(), STORE)
        if re.search(r"[?&](key_file|allow_plaintext)=", store):
            raise PolicyError(f"{STORE}: encryption keys come from the node configuration, not annotations")
        store = with_key_files(store, node.encryption_key_files)
    else:
        store = node.store
    on_stop = parse_bool(annotations[ON_STOP], ON_STOP) if ON_STOP in annotations else node.checkpoint_on_stop
    keep = parse_keep(annotations[KEEP], KEEP) if KEEP in annotations else node.keep
    return Protection(key=key, store=store, interval_s=interval, checkpoint_on_stop=on_stop, keep=keep)
