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

DEFAULT_CONFIG_PATH = Path("/etc/revenant/config.toml")
DEFAULT_STORE = "file:///var/lib/revenant/store"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_KEY_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,253}$")


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
        return cfg


@dataclass(frozen=True)
class Protection:
    """How one container is protected."""

    key: str
    store: str
    interval_s: float
    checkpoint_on_stop: bool
    keep: int


def checkpoint_key(annotations: Mapping[str, str]) -> str | None:
    """The explicit key, else `<namespace>/<pod>/<container>` for a Kubernetes app container.
    A pod's sandbox (pause) container is never protected: CRI passes the pod's `revenant.io/*`
    annotations to it as well, and it must not claim the app container's key."""
    if annotations.get(CRI_CONTAINER_TYPE) == "sandbox":
        return None
    if KEY in annotations:
        key = annotations[KEY].strip()
        if not _KEY_OK.match(key) or ".." in key.split("/"):
            raise PolicyError(f"{KEY}: {key!r} must be 1-254 characters of letters, digits, '.', '_', '-', '/'")
        return key
    if annotations.get(CRI_CONTAINER_TYPE) == "container":
        parts = [annotations.get(k, "") for k in (CRI_POD_NAMESPACE, CRI_POD_NAME, CRI_CONTAINER_NAME)]
        if all(parts):
            return "/".join(parts)
    return None


def protection_for(annotations: Mapping[str, str], node: NodeConfig) -> Protection | None:
    """The container's protection, or None when it has no checkpoint key (then revenant leaves it alone)."""
    key = checkpoint_key(annotations)
    if key is None:
        return None
    interval = node.checkpoint_interval_s
    if INTERVAL in annotations:
        interval = parse_duration(annotations[INTERVAL], INTERVAL)
    store = validate_store_url(annotations[STORE].strip(), STORE) if STORE in annotations else node.store
    on_stop = parse_bool(annotations[ON_STOP], ON_STOP) if ON_STOP in annotations else node.checkpoint_on_stop
    keep = parse_keep(annotations[KEEP], KEEP) if KEEP in annotations else node.keep
    return Protection(key=key, store=store, interval_s=interval, checkpoint_on_stop=on_stop, keep=keep)
