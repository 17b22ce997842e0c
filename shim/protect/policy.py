"""Which containers revenant protects, and how: OCI annotations over node defaults.

Annotations (set by `ctr run --annotation`, Docker `--annotation`, or Kubernetes pod annotations
passed through CRI) win over `/etc/revenant/config.toml`. A bad value is an error at Create, never a
silent default: a job its owner believes protected must not run unprotected.

Annotations come from the workload, the node config from the node's owner (docs/security.md,
"Tenancy"): an annotation names one of the node's configured stores, never a URL of its own (unless
the node allows it), and a Kubernetes pod's key stays under its namespace.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from shim.errors import InvalidArgument
from shim.hosts import is_loopback

KEY = "revenant.io/checkpoint-key"
INTERVAL = "revenant.io/checkpoint-interval"
STORE = "revenant.io/store"
ON_STOP = "revenant.io/checkpoint-on-stop"
KEEP = "revenant.io/keep"

CRI_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
CRI_CONTAINER_NAME = "io.kubernetes.cri.container-name"
CRI_POD_NAME = "io.kubernetes.cri.sandbox-name"
CRI_POD_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
K8S_POD_NAMESPACE = "io.kubernetes.pod.namespace"
# Set by the Job controller on each pod of an Indexed Job (a pod annotation, passed through by the
# CRI handler's pod_annotations in packaging/containerd/).
JOB_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"

DEFAULT_CONFIG_PATH = Path("/etc/revenant/config.toml")
DEFAULT_STORE = "file:///var/lib/revenant/store"
DEFAULT_STORE_NAME = "default"
MIN_INTERVAL_S = 10.0  # node default; a node config may lower it (min_checkpoint_interval)
MAX_INTERVAL_S = 30 * 86400.0
MAX_STOP_DEADLINE_S = 3600.0
MAX_REPLICAS = 8
DEFAULT_STREAM_BUDGET_MIB = 128  # streamed by default: bench/RESULTS.md, "Streaming with page-granular dedup ..."
MIN_STREAM_BUDGET_MIB = 16
MAX_STREAM_BUDGET_MIB = 1 << 20
_NAME_OK = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_K8S_NAMESPACE_OK = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_AUTH_FILE_OK = re.compile(r"^/[A-Za-z0-9._/-]{1,4095}$")
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
    if pos != len(value) or pos == 0 or not math.isfinite(total):
        raise PolicyError(f"{what}: {text!r} is not a duration (examples: 30s, 10m, 1h30m, off)")
    return total


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def parse_interval(text: str, what: str, minimum: float = MIN_INTERVAL_S) -> float:
    """A checkpoint interval: `off` (or `never`), else between `minimum` and 30 days.

    A zero duration such as `0s` is refused rather than read as off: say `off` when off is meant."""
    value = text.strip()
    if value in ("off", "never"):
        return 0.0
    seconds = parse_duration(value, what) if value != "0" else 0.0
    if seconds == 0:
        raise PolicyError(f"{what}: {text!r} is zero; write 'off' to turn periodic checkpoints off")
    if not minimum <= seconds <= MAX_INTERVAL_S:
        raise PolicyError(
            f"{what}: {text!r} is outside the allowed range {_human(minimum)} .. {_human(MAX_INTERVAL_S)} (or 'off')"
        )
    return seconds


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


# The query options each backend reads (shim/store/backends); anything else is a typo or a trick.
# key_file and allow_plaintext (encryption, shim/store) only from the node config, never an annotation.
_STORE_OPTIONS = {
    "file": {"packs", "key_file", "allow_plaintext"},
    "s3": {"endpoint", "region", "multipart_mb", "packs", "pack_mb", "key_file", "allow_plaintext"},
    # hmac_key_id/hmac_secret_file/auth: the node's [gcs] credentials (shim.store.backends.gcs), never an annotation's.
    "gs": {
        *("endpoint", "multipart_mb", "packs", "pack_mb", "key_file", "allow_plaintext"),
        *("hmac_key_id", "hmac_secret_file", "auth"),
    },
    "oci": {"insecure", "mount_from", "chunked_mb", "key_file", "allow_plaintext", "auth_file"},
    "az": {"endpoint", "block_mb", "packs", "pack_mb", "key_file", "allow_plaintext", "credentials_file"},
}
_BOOL_WORDS = {"1", "0", "true", "false", "yes", "no"}
# shim.store.backends.packs' bound (limits.MAX_PACK_MB), not imported: a shim's start path loads this
# module without the store.
_MAX_PACK_MB = 256
_S3_BUCKET_OK = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# GCS's rules; the backend checks them in full (dot-separated parts, IP addresses): shim.store.backends.gcs.
_GCS_BUCKET_OK = re.compile(r"^(?!goog)(?!.*g(?:oo|00)gle)[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]$")
_GCS_KEY_ID_OK = re.compile(r"^[A-Za-z0-9]{4,128}$")
_REGION_OK = re.compile(r"^[a-z0-9-]{1,32}$")
# Azure's naming rules (shim.store.backends.azure has the same; not imported, see _MAX_PACK_MB).
_AZ_ACCOUNT_OK = re.compile(r"^[a-z0-9]{3,24}$")
_AZ_CONTAINER_OK = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(?:-[a-z0-9]+)*$")
_AZ_PREFIX_OK = re.compile(r"^(?!.*(?:^|/)\.{1,2}(?:/|$))[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*$")
_AZ_MAX_BLOCK_MB = 100
_REPO_OK = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$")


def _megabytes(value: str, what: str, low: float, high: float) -> None:
    try:
        mb = float(value)
    except ValueError:
        raise PolicyError(f"{what}: {value!r} is not a number of MiB") from None
    if not (math.isfinite(mb) and low <= mb <= high):
        raise PolicyError(f"{what}: {value!r} MiB is outside {low:g} .. {high:g}")


def validate_store_url(url: str, what: str) -> str:
    """Check a store URL completely at Create, so a bad one fails there and not at the first checkpoint."""
    m = re.match(r"^(file|s3|az|gs|oci)://.+", url)
    if not m:
        raise PolicyError(f"{what}: {url!r} is not a store URL (file://, s3://, az://, gs:// or oci://)")
    scheme = m[1]
    try:
        u = urlsplit(url)
        query = parse_qs(u.query, keep_blank_values=True, strict_parsing=bool(u.query))
    except ValueError as e:
        raise PolicyError(f"{what}: {url!r} is not a valid URL ({e})") from None
    if u.fragment or "@" in u.netloc:
        raise PolicyError(f"{what}: {url!r}: no fragment or user@ part allowed (credentials stay out of URLs)")
    unknown = set(query) - _STORE_OPTIONS[scheme]
    if unknown:
        raise PolicyError(
            f"{what}: {url!r}: unknown option(s) {', '.join(sorted(unknown))} for {scheme}:// "
            f"(known: {', '.join(sorted(_STORE_OPTIONS[scheme]))})"
        )
    repeated = [k for k, v in query.items() if len(v) > 1]
    if repeated:
        raise PolicyError(f"{what}: {url!r}: option(s) {', '.join(sorted(repeated))} given more than once")
    opt = {k: v[0] for k, v in query.items()}
    if scheme == "file":
        if u.netloc not in ("", "localhost") or not u.path.startswith("/"):
            raise PolicyError(f"{what}: {url!r}: a file store needs an absolute path (file:///dir)")
        if ".." in u.path.split("/"):
            raise PolicyError(f"{what}: {url!r}: '..' is not allowed in a store path")
        if "packs" in opt and opt["packs"] not in _BOOL_WORDS:
            raise PolicyError(f"{what}: {url!r}: packs={opt['packs']!r} is not true or false")
    elif scheme in ("s3", "gs"):
        if scheme == "s3" and not _S3_BUCKET_OK.match(u.netloc):
            raise PolicyError(f"{what}: {url!r}: {u.netloc!r} is not an S3 bucket name")
        if scheme == "gs" and not _GCS_BUCKET_OK.match(u.netloc):
            raise PolicyError(f"{what}: {url!r}: {u.netloc!r} is not a GCS bucket name")
        if "endpoint" in opt:
            ep = urlsplit(opt["endpoint"])
            if ep.scheme not in ("http", "https") or not ep.hostname or ep.path not in ("", "/") or ep.query:
                raise PolicyError(f"{what}: {url!r}: endpoint must be http(s)://HOST[:PORT]")
            if scheme == "gs" and ep.scheme == "http" and not is_loopback(ep.hostname):
                raise PolicyError(f"{what}: {url!r}: a gs endpoint is https (plain http only to a loopback address)")
        if "hmac_key_id" in opt and not _GCS_KEY_ID_OK.match(opt["hmac_key_id"]):
            raise PolicyError(f"{what}: {url!r}: hmac_key_id is not a GCS HMAC access id")
        if "hmac_secret_file" in opt and not _AUTH_FILE_OK.match(opt["hmac_secret_file"]):
            raise PolicyError(f"{what}: {url!r}: hmac_secret_file must be an absolute path")
        if "auth" in opt and opt["auth"] not in ("hmac", "metadata"):
            raise PolicyError(f"{what}: {url!r}: auth={opt['auth']!r} is not hmac or metadata")
        if "region" in opt and not _REGION_OK.match(opt["region"]):
            raise PolicyError(f"{what}: {url!r}: region {opt['region']!r} is not a region name")
        if "multipart_mb" in opt:
            _megabytes(opt["multipart_mb"], f"{what} multipart_mb", 5, 5120)
        if "packs" in opt and opt["packs"] not in _BOOL_WORDS:
            raise PolicyError(f"{what}: {url!r}: packs={opt['packs']!r} is not true or false")
        if "pack_mb" in opt and not (opt["pack_mb"].isdigit() and 1 <= int(opt["pack_mb"]) <= _MAX_PACK_MB):
            raise PolicyError(f"{what}: {url!r}: pack_mb={opt['pack_mb']!r} is not a whole number 1 .. {_MAX_PACK_MB}")
    elif scheme == "az":
        _check_az(u.netloc, u.path, opt, url, what)
    else:
        if not u.hostname or not _REPO_OK.match(u.path.strip("/")):
            raise PolicyError(f"{what}: {url!r}: an OCI store is oci://REGISTRY[:PORT]/REPOSITORY")
        if "insecure" in opt and opt["insecure"] not in _BOOL_WORDS:
            raise PolicyError(f"{what}: {url!r}: insecure={opt['insecure']!r} is not true or false")
        if "chunked_mb" in opt:
            _megabytes(opt["chunked_mb"], f"{what} chunked_mb", 1, 1024)
        if "mount_from" in opt and not all(_REPO_OK.match(r) for r in opt["mount_from"].split(",")):
            raise PolicyError(f"{what}: {url!r}: mount_from must list repositories separated by commas")
    return url


def _check_az(account: str, path: str, opt: dict[str, str], url: str, what: str) -> None:
    """az://ACCOUNT/CONTAINER[/PREFIX][?endpoint=..][&block_mb=N][&pack_mb=N][&packs=..]"""
    container, _, prefix = path.strip("/").partition("/")
    if not _AZ_ACCOUNT_OK.match(account):
        raise PolicyError(f"{what}: {url!r}: {account!r} is not an Azure storage account name")
    if not _AZ_CONTAINER_OK.match(container):
        raise PolicyError(f"{what}: {url!r}: {container!r} is not an Azure container name")
    if prefix and (len(prefix) > 512 or not _AZ_PREFIX_OK.match(prefix)):
        raise PolicyError(f"{what}: {url!r}: the prefix must be path segments of letters, digits, '.', '_', '-'")
    if "endpoint" in opt:
        ep = urlsplit(opt["endpoint"])
        host = ep.hostname or ""
        if ep.scheme not in ("http", "https") or not host or ep.path.strip("/") not in ("", account) or ep.query:
            raise PolicyError(f"{what}: {url!r}: endpoint must be http(s)://HOST[:PORT][/{account}]")
        if ep.scheme == "http" and not is_loopback(host):
            raise PolicyError(f"{what}: {url!r}: plain http is allowed only to a loopback endpoint")
    if "block_mb" in opt and not (opt["block_mb"].isdigit() and 1 <= int(opt["block_mb"]) <= _AZ_MAX_BLOCK_MB):
        raise PolicyError(
            f"{what}: {url!r}: block_mb={opt['block_mb']!r} is not a whole number 1 .. {_AZ_MAX_BLOCK_MB}"
        )
    if "packs" in opt and opt["packs"] not in _BOOL_WORDS:
        raise PolicyError(f"{what}: {url!r}: packs={opt['packs']!r} is not true or false")
    if "pack_mb" in opt and not (opt["pack_mb"].isdigit() and 1 <= int(opt["pack_mb"]) <= _MAX_PACK_MB):
        raise PolicyError(f"{what}: {url!r}: pack_mb={opt['pack_mb']!r} is not a whole number 1 .. {_MAX_PACK_MB}")


@dataclass(frozen=True)
class NodeConfig:
    """Node defaults from /etc/revenant/config.toml (every field optional there).

    `stores` maps the names an annotation may use to URLs; `store` is the default store's URL (the
    old single `store = URL` setting defines the store named "default"). `replicas` maps a store name
    to the URLs its checkpoints are copied to (docs/replication.md); `failover` names the
    stores whose replicas a restore may read while the primary does not answer."""

    store: str = DEFAULT_STORE
    stores: Mapping[str, str] = field(default_factory=lambda: {DEFAULT_STORE_NAME: DEFAULT_STORE})
    default_store: str = DEFAULT_STORE_NAME
    replicas: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    failover: frozenset[str] = frozenset()
    allow_store_urls: bool = False  # single-tenant nodes only: an annotation may then give any URL
    allow_cross_namespace_keys: bool = False  # [tenancy]: a pod may name a key outside its namespace
    any_key_namespaces: tuple[str, ...] = ()  # [tenancy]: namespaces whose pods may name any key
    checkpoint_interval_s: float = 0.0
    min_interval_s: float = MIN_INTERVAL_S
    keep: int = 3
    checkpoint_on_stop: bool = False
    stop_deadline_s: float = 60.0
    run_dir: Path = Path("/run/revenant")
    staging_dir: Path = Path("/dev/shm/revenant")
    scratch_dir: Path = Path("/var/lib/revenant/scratch")  # on-disk staging fallback and restore scratch
    # Streaming dump (shim.protect.streaming): CRIU dumps into scratch_dir while the store consumes it,
    # at most this many MiB of the dump held in memory; 0: the whole dump staged in staging_dir first.
    stream_budget_mib: int = DEFAULT_STREAM_BUDGET_MIB
    # Lazy restore (shim.checkpoint.lazy_restore): a CPU-only checkpoint's anonymous memory stays in the
    # store at Create; the job runs as soon as CRIU has rebuilt it and faults its pages in, verified, from
    # a page server of the shim's while the rest streams in behind. A store failure then kills the job.
    lazy_restore: bool = False
    # [encryption] key_file (seals new checkpoints) then old_key_files (still read): every store URL
    # gets them as `key_file=` (shim.store.open_store), annotation URLs may not name any.
    encryption_key_files: tuple[str, ...] = ()
    # [registry] auth_file: a Docker-config-format file with registry credentials (a node secret): every
    # oci:// store URL gets it as `auth_file=` (shim.store.backends.registry_auth), annotation URLs may not.
    registry_auth_file: str | None = None
    # [gcs] hmac_key_id + hmac_secret_file (an HMAC key, a node secret) or auth = "metadata" (the instance's
    # service account): every gs:// URL gets them as options (shim.store.backends.gcs), annotation URLs may
    # not name any.
    gcs_auth: tuple[tuple[str, str], ...] = ()
    # [azure] credentials_file: an Azure connection string (AccountName + AccountKey or SharedAccessSignature),
    # a node secret: every az:// store URL gets it as `credentials_file=` (shim.store.backends.azure).
    azure_credentials_file: str | None = None

    @classmethod
    def load(cls, path: Path = DEFAULT_CONFIG_PATH) -> NodeConfig:
        if not path.exists():
            return cls()
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise PolicyError(f"{path}: {e}") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> NodeConfig:
        known = {
            "store",
            "stores",
            "default_store",
            "allow_store_urls",
            "tenancy",
            "checkpoint_interval",
            "min_checkpoint_interval",
            "keep",
            "checkpoint_on_stop",
            "stop_deadline",
            "run_dir",
            "staging_dir",
            "scratch_dir",
            "stream_budget_mib",
            "lazy_restore",
            "encryption",
            "registry",
            "gcs",
            "azure",
        }
        unknown = set(data) - known
        if unknown:
            raise PolicyError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
        cfg = cls()
        stores = _stores(data, where)
        replicas, failover = _replicas(data, stores, where)
        default = str(data.get("default_store", DEFAULT_STORE_NAME))
        if default not in stores:
            raise PolicyError(f"{where} default_store: no [stores.{default}] (configured: {', '.join(sorted(stores))})")
        cfg = replace(cfg, stores=stores, default_store=default, store=stores[default])
        cfg = replace(cfg, replicas=replicas, failover=failover)
        if "allow_store_urls" in data:
            cfg = replace(cfg, allow_store_urls=parse_bool(str(data["allow_store_urls"]), f"{where} allow_store_urls"))
        if "tenancy" in data:
            cfg = _tenancy(cfg, data["tenancy"], f"{where} [tenancy]")
        if "min_checkpoint_interval" in data:
            minimum = parse_duration(str(data["min_checkpoint_interval"]), f"{where} min_checkpoint_interval")
            if not 1 <= minimum <= MAX_INTERVAL_S:
                raise PolicyError(f"{where} min_checkpoint_interval: must be at least 1s")
            cfg = replace(cfg, min_interval_s=minimum)
        if "checkpoint_interval" in data:
            what = f"{where} checkpoint_interval"
            cfg = replace(
                cfg, checkpoint_interval_s=parse_interval(str(data["checkpoint_interval"]), what, cfg.min_interval_s)
            )
        if "keep" in data:
            cfg = replace(cfg, keep=parse_keep(data["keep"], f"{where} keep"))
        if "checkpoint_on_stop" in data:
            cfg = replace(
                cfg, checkpoint_on_stop=parse_bool(str(data["checkpoint_on_stop"]), f"{where} checkpoint_on_stop")
            )
        if "stop_deadline" in data:
            deadline = parse_duration(str(data["stop_deadline"]), f"{where} stop_deadline")
            if not 0 < deadline <= MAX_STOP_DEADLINE_S:
                raise PolicyError(f"{where} stop_deadline: {data['stop_deadline']!r} is outside 1s .. 1h")
            cfg = replace(cfg, stop_deadline_s=deadline)
        if "run_dir" in data:
            cfg = replace(cfg, run_dir=_absolute(data["run_dir"], f"{where} run_dir"))
        if "staging_dir" in data:
            cfg = replace(cfg, staging_dir=_absolute(data["staging_dir"], f"{where} staging_dir"))
        if "scratch_dir" in data:
            cfg = replace(cfg, scratch_dir=_absolute(data["scratch_dir"], f"{where} scratch_dir"))
        if "stream_budget_mib" in data:
            cfg = replace(
                cfg, stream_budget_mib=_stream_budget(data["stream_budget_mib"], f"{where} stream_budget_mib")
            )
        if "lazy_restore" in data:
            cfg = replace(cfg, lazy_restore=parse_bool(str(data["lazy_restore"]), f"{where} lazy_restore"))
        if "encryption" in data:
            keys = parse_encryption(data["encryption"], f"{where} [encryption]")
            stores = {name: with_key_files(url, keys) for name, url in cfg.stores.items()}
            cfg = replace(cfg, encryption_key_files=keys, stores=stores, store=stores[cfg.default_store])
            # Replicas hold the same sealed objects: they get the same keys (docs/replication.md).
            replicas = {n: tuple(with_key_files(u, keys) for u in urls) for n, urls in cfg.replicas.items()}
            cfg = replace(cfg, replicas=replicas)
        if "registry" in data:
            auth_file = parse_registry(data["registry"], f"{where} [registry]")
            stores = {name: with_auth_file(url, auth_file) for name, url in cfg.stores.items()}
            cfg = replace(cfg, registry_auth_file=auth_file, stores=stores, store=stores[cfg.default_store])
            replicas = {n: tuple(with_auth_file(u, auth_file) for u in urls) for n, urls in cfg.replicas.items()}
            cfg = replace(cfg, replicas=replicas)
        if "gcs" in data:
            gcs = parse_gcs(data["gcs"], f"{where} [gcs]")
            stores = {name: with_gcs_auth(url, gcs) for name, url in cfg.stores.items()}
            cfg = replace(cfg, gcs_auth=gcs, stores=stores, store=stores[cfg.default_store])
            replicas = {n: tuple(with_gcs_auth(u, gcs) for u in urls) for n, urls in cfg.replicas.items()}
            cfg = replace(cfg, replicas=replicas)
        if "azure" in data:
            creds = parse_azure(data["azure"], f"{where} [azure]")
            stores = {name: with_azure_credentials(url, creds) for name, url in cfg.stores.items()}
            cfg = replace(cfg, azure_credentials_file=creds, stores=stores, store=stores[cfg.default_store])
            replicas = {n: tuple(with_azure_credentials(u, creds) for u in urls) for n, urls in cfg.replicas.items()}
            cfg = replace(cfg, replicas=replicas)
        return cfg


def _stream_budget(value: object, what: str) -> int:
    if type(value) is not int or not (value == 0 or MIN_STREAM_BUDGET_MIB <= value <= MAX_STREAM_BUDGET_MIB):
        raise PolicyError(
            f"{what}: {value!r} is not 0 (stage the whole dump) or a whole number of MiB "
            f"{MIN_STREAM_BUDGET_MIB} .. {MAX_STREAM_BUDGET_MIB}"
        )
    return value


def _absolute(value: object, what: str) -> Path:
    path = Path(str(value))
    if not path.is_absolute():
        raise PolicyError(f"{what}: {value!r} is not an absolute path")
    return path


def _stores(data: dict[str, Any], where: str) -> dict[str, str]:
    """[stores.NAME] url = ... plus the single `store = URL` setting as the store named "default"."""
    table = data.get("stores", {})
    if not isinstance(table, dict):
        raise PolicyError(f"{where} stores: expected [stores.NAME] tables")
    stores: dict[str, str] = {}
    for name, entry in table.items():
        what = f"{where} [stores.{name}]"
        if not _NAME_OK.match(name):
            raise PolicyError(f"{what}: a store name is lower-case letters, digits, '.', '_', '-'")
        if not isinstance(entry, dict) or "url" not in entry or set(entry) - {"url", "replicas", "failover"}:
            raise PolicyError(f'{what}: expected url = "..." and optionally replicas = [...] and failover = false')
        stores[name] = validate_store_url(str(entry["url"]), f"{what} url")
    if "store" in data:
        if DEFAULT_STORE_NAME in stores:
            raise PolicyError(f"{where}: store and [stores.{DEFAULT_STORE_NAME}] both define the default store")
        stores[DEFAULT_STORE_NAME] = validate_store_url(str(data["store"]), f"{where} store")
    elif not stores:
        stores[DEFAULT_STORE_NAME] = DEFAULT_STORE
    return stores


def _replicas(
    data: dict[str, Any], stores: Mapping[str, str], where: str
) -> tuple[dict[str, tuple[str, ...]], frozenset[str]]:
    """[stores.NAME] replicas = ["OTHER-NAME" or "URL", ...] and failover = true|false.

    A replica is another configured store (by name: its URL, not its own replicas) or a URL checked
    exactly like a primary's. A URL form exists so that a replica-only location (another region's
    bucket) need not become a store that annotations may pick as their primary."""
    table = data.get("stores", {})
    replicas: dict[str, tuple[str, ...]] = {}
    failover: set[str] = set()
    for name, entry in table.items():
        what = f"{where} [stores.{name}]"
        listed = entry.get("replicas", [])
        if not isinstance(listed, list) or not all(isinstance(r, str) for r in listed):
            raise PolicyError(f"{what} replicas: expected a list of store names or URLs")
        if len(listed) > MAX_REPLICAS:
            raise PolicyError(f"{what} replicas: at most {MAX_REPLICAS} replicas, got {len(listed)}")
        urls: list[str] = []
        for r in listed:
            if "://" in r:
                url = validate_store_url(r, f"{what} replicas")
            elif r in stores:
                url = stores[r]
            else:
                raise PolicyError(
                    f"{what} replicas: {r!r} is neither a URL nor a configured store ({', '.join(sorted(stores))})"
                )
            if url == stores[name]:
                raise PolicyError(f"{what} replicas: {r!r} is the store itself")
            if url in urls:
                raise PolicyError(f"{what} replicas: {r!r} is listed twice")
            urls.append(url)
        if "failover" in entry and parse_bool(str(entry["failover"]), f"{what} failover"):
            if not urls:
                raise PolicyError(f"{what} failover: needs replicas to fail over to")
            failover.add(name)
        if urls:
            replicas[name] = tuple(urls)
    return replicas, frozenset(failover)


def _tenancy(cfg: NodeConfig, table: object, what: str) -> NodeConfig:
    if not isinstance(table, dict):
        raise PolicyError(f"{what}: expected a table")
    unknown = set(table) - {"allow_cross_namespace_keys", "any_key_namespaces"}
    if unknown:
        raise PolicyError(f"{what}: unknown setting(s) {', '.join(sorted(unknown))}")
    if "allow_cross_namespace_keys" in table:
        allow = parse_bool(str(table["allow_cross_namespace_keys"]), f"{what} allow_cross_namespace_keys")
        cfg = replace(cfg, allow_cross_namespace_keys=allow)
    if "any_key_namespaces" in table:
        names = table["any_key_namespaces"]
        if not isinstance(names, list) or not all(isinstance(n, str) and _K8S_NAMESPACE_OK.match(n) for n in names):
            raise PolicyError(f"{what} any_key_namespaces: expected a list of Kubernetes namespace names")
        cfg = replace(cfg, any_key_namespaces=tuple(names))
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


def parse_registry(table: object, what: str) -> str:
    if not isinstance(table, dict) or set(table) != {"auth_file"}:
        raise PolicyError(f'{what}: expected auth_file = "/path" (a Docker config file with registry credentials)')
    path = table["auth_file"]
    if not isinstance(path, str) or not _AUTH_FILE_OK.match(path) or ".." in path.split("/"):
        raise PolicyError(f"{what} auth_file: {path!r} must be an absolute path of letters, digits, '.', '_', '-'")
    return path


def with_auth_file(url: str, auth_file: str | None) -> str:
    """An oci:// store URL carrying the node's registry credentials file (an annotation URL may not name one)."""
    if not auth_file or not url.startswith("oci://"):
        return url
    return f"{url}{'&' if '?' in url else '?'}auth_file={auth_file}"


def parse_gcs(table: object, what: str) -> tuple[tuple[str, str], ...]:
    """The gs:// URL options for the node's GCS credentials."""
    if isinstance(table, dict) and table == {"auth": "metadata"}:
        return (("auth", "metadata"),)
    if not isinstance(table, dict) or set(table) != {"hmac_key_id", "hmac_secret_file"}:
        raise PolicyError(
            f'{what}: expected hmac_key_id = "GOOG1..." and hmac_secret_file = "/path" (mode 0600), '
            'or auth = "metadata" (the instance\'s service account)'
        )
    key_id, path = table["hmac_key_id"], table["hmac_secret_file"]
    if not isinstance(key_id, str) or not _GCS_KEY_ID_OK.match(key_id):
        raise PolicyError(f"{what} hmac_key_id: not a GCS HMAC access id (letters and digits)")
    if not isinstance(path, str) or not _AUTH_FILE_OK.match(path) or ".." in path.split("/"):
        raise PolicyError(
            f"{what} hmac_secret_file: {path!r} must be an absolute path of letters, digits, '.', '_', '-'"
        )
    return (("hmac_key_id", key_id), ("hmac_secret_file", path))


def with_gcs_auth(url: str, options: tuple[tuple[str, str], ...]) -> str:
    """A gs:// store URL carrying the node's GCS credential options (an annotation URL may not name them)."""
    if not options or not url.startswith("gs://"):
        return url
    return f"{url}{'&' if '?' in url else '?'}{'&'.join(f'{k}={v}' for k, v in options)}"


def parse_azure(table: object, what: str) -> str:
    if not isinstance(table, dict) or set(table) != {"credentials_file"}:
        raise PolicyError(f'{what}: expected credentials_file = "/path" (a file with an Azure connection string)')
    path = table["credentials_file"]
    if not isinstance(path, str) or not _AUTH_FILE_OK.match(path) or ".." in path.split("/"):
        raise PolicyError(
            f"{what} credentials_file: {path!r} must be an absolute path of letters, digits, '.', '_', '-'"
        )
    return path


def with_azure_credentials(url: str, credentials_file: str | None) -> str:
    """An az:// store URL carrying the node's Azure credentials file (an annotation URL may not name one)."""
    if not credentials_file or not url.startswith("az://"):
        return url
    return f"{url}{'&' if '?' in url else '?'}credentials_file={credentials_file}"


@dataclass(frozen=True)
class Protection:
    """How one container is protected."""

    key: str
    store: str
    interval_s: float
    checkpoint_on_stop: bool
    keep: int
    replicas: tuple[str, ...] = ()  # store URLs the checkpoints are copied to after each commit
    failover: bool = False  # a restore may read the replicas while the primary store does not answer


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
        parts = key.split("/")
        if not _KEY_OK.match(key) or any(p in ("", ".", "..") for p in parts):
            raise PolicyError(
                f"{KEY}: {key!r} must be 1-254 characters of letters, digits, '.', '_', '-', '/' "
                "(no empty, '.' or '..' path parts)"
            )
        return key
    if annotations.get(CRI_CONTAINER_TYPE) == "container":
        parts = [annotations.get(k, "") for k in (CRI_POD_NAMESPACE, CRI_POD_NAME, CRI_CONTAINER_NAME)]
        if all(parts):
            return "/".join(parts)
    return None


def pod_namespace(annotations: Mapping[str, str]) -> str | None:
    """The Kubernetes namespace of a pod's container (None: not a pod's container).

    containerd's CRI plugin sets the sandbox-namespace annotation itself; a pod that also carries
    a different io.kubernetes.pod.namespace (pod annotations passed through) is refused."""
    names = {a: annotations[a].strip() for a in (CRI_POD_NAMESPACE, K8S_POD_NAMESPACE) if a in annotations}
    if not names:
        return None
    if len(set(names.values())) > 1 or not all(_K8S_NAMESPACE_OK.match(n) for n in names.values()):
        shown = ", ".join(f"{a}={n!r}" for a, n in names.items())
        raise PolicyError(f"{KEY}: the container's namespace annotations disagree or are malformed ({shown})")
    return next(iter(names.values()))


def confine_key(key: str, annotations: Mapping[str, str], node: NodeConfig) -> str:
    """A pod's key must sit under `<its namespace>/` unless the node config widens that.

    Containers that containerd's CRI plugin did not create (ctr, Docker, nerdctl) are not confined:
    whoever may call containerd's API directly is root on the node already (docs/security.md)."""
    namespace = pod_namespace(annotations)
    if namespace is None or node.allow_cross_namespace_keys or namespace in node.any_key_namespaces:
        return key
    if not key.startswith(f"{namespace}/"):
        raise PolicyError(
            f"{KEY}: {key!r} is outside the pod's namespace: a pod in {namespace!r} may only use keys "
            f"starting with '{namespace}/' (write templates as '${{namespace}}/...'; the node config's [tenancy] "
            "section can widen this)"
        )
    return key


def store_for(annotations: Mapping[str, str], node: NodeConfig) -> str:
    """The store URL: the node's default, or the configured store the annotation names."""
    if STORE not in annotations:
        return node.store
    value = annotations[STORE].strip()
    names = ", ".join(sorted(node.stores))
    if "://" in value:
        if re.search(r"[?&](key_file|allow_plaintext)=", value):
            raise PolicyError(f"{STORE}: encryption keys come from the node configuration, not annotations")
        # Checked on the parsed query too: `auth%5Ffile=` decodes to auth_file.
        named = set(parse_qs(urlsplit(value).query, keep_blank_values=True))
        if named & {"key_file", "allow_plaintext"}:
            raise PolicyError(f"{STORE}: encryption keys come from the node configuration, not annotations")
        if "auth_file" in named or re.search(r"[?&]auth_file=", value):
            raise PolicyError(f"{STORE}: registry credentials come from the node configuration, not annotations")
        if named & {"hmac_key_id", "hmac_secret_file", "auth"} or re.search(r"[?&](hmac_|auth=)", value):
            raise PolicyError(f"{STORE}: GCS credentials come from the node configuration, not annotations")
        if "credentials_file" in named or re.search(r"[?&]credentials_file=", value):
            raise PolicyError(f"{STORE}: Azure credentials come from the node configuration, not annotations")
        if not node.allow_store_urls:
            raise PolicyError(
                f"{STORE}: {value!r} is a URL, and this node accepts only the name of one of its configured "
                f"stores ({names}); URLs need allow_store_urls = true in the node config"
            )
        url = with_key_files(validate_store_url(value, STORE), node.encryption_key_files)
        url = with_azure_credentials(with_auth_file(url, node.registry_auth_file), node.azure_credentials_file)
        return with_gcs_auth(url, node.gcs_auth)
    if value not in node.stores:
        raise PolicyError(f"{STORE}: this node has no store named {value!r} (configured: {names})")
    return node.stores[value]


def replicas_for(annotations: Mapping[str, str], node: NodeConfig) -> tuple[tuple[str, ...], bool]:
    """The chosen store's replicas and failover setting. Only the node config adds replicas: an
    annotation naming a URL (allow_store_urls) gets none, and no annotation can add one."""
    if STORE not in annotations:
        name = node.default_store
    else:
        name = annotations[STORE].strip()
        if "://" in name:
            return (), False
    return tuple(node.replicas.get(name, ())), name in node.failover


def protection_for(annotations: Mapping[str, str], node: NodeConfig) -> Protection | None:
    """The container's protection, or None when it has no checkpoint key (then revenant leaves it alone)."""
    key = checkpoint_key(annotations)
    if key is None:
        return None
    key = confine_key(key, annotations, node)
    interval = node.checkpoint_interval_s
    if INTERVAL in annotations:
        interval = parse_interval(annotations[INTERVAL], INTERVAL, node.min_interval_s)
    store = store_for(annotations, node)
    on_stop = parse_bool(annotations[ON_STOP], ON_STOP) if ON_STOP in annotations else node.checkpoint_on_stop
    keep = parse_keep(annotations[KEEP], KEEP) if KEEP in annotations else node.keep
    replicas, failover = replicas_for(annotations, node)
    return Protection(
        key=key,
        store=store,
        interval_s=interval,
        checkpoint_on_stop=on_stop,
        keep=keep,
        replicas=replicas,
        failover=failover,
    )


CONFIG_ENV = "REVENANT_CONFIG"


def load_node_config() -> NodeConfig:
    return NodeConfig.load(Path(os.environ.get(CONFIG_ENV) or "/etc/revenant/config.toml"))


def bundle_annotations(bundle: str) -> dict[str, str]:
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            return dict(json.load(f).get("annotations") or {})
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"cannot read the bundle's config.json: {e}") from None
