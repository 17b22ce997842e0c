"""Which runc a container uses and where runc keeps its state.

The root comes from containerd.runc.v1 Options.root when the client sent one; otherwise it is derived
from the bundle path, so two private containerd instances never share runc state (runc's default,
/run/containerd/runc, is per machine): <state>/io.containerd.runtime.v2.task/<ns>/<id> ->
<state>/revenant/runc/<ns>. The choice is saved in the bundle so the `delete` action, which runs after
the shim is gone, finds the same root.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

OPTIONS_FILE = "revenant-options.json"
OPTIONS_TYPE = "containerd.runc.v1.Options"


@dataclass
class RuntimeOptions:
    root: str
    binary: str = "runc"
    systemd_cgroup: bool = False
    no_pivot_root: bool = False
    no_new_keyring: bool = False
    criu_image_path: str = ""
    criu_work_path: str = ""

    def save(self, bundle: str) -> None:
        path = Path(bundle, OPTIONS_FILE)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, path)

    @classmethod
    def load(cls, bundle: str) -> RuntimeOptions | None:
        try:
            data = json.loads(Path(bundle, OPTIONS_FILE).read_text())
        except (OSError, ValueError):
            return None
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def default_root(bundle: str, namespace: str) -> str:
    bundle_path = Path(bundle).resolve()
    state = bundle_path.parent.parent.parent  # <state>/io.containerd.runtime.v2.task/<ns>/<id>
    return str(state / "revenant" / "runc" / namespace)


def from_request(options_any: object | None, bundle: str, namespace: str) -> RuntimeOptions:
    """RuntimeOptions from CreateTaskRequest.options (a google.protobuf.Any, possibly empty)."""
    opts = RuntimeOptions(root=default_root(bundle, namespace))
    type_url = getattr(options_any, "type_url", "") or ""
    if not type_url:
        return opts
    if not type_url.endswith(OPTIONS_TYPE):
        raise ValueError(f"unsupported runtime options type {type_url!r}; want {OPTIONS_TYPE}")
    from revenant_pb.containerd.runc.v1 import oci_pb2

    runc_opts = oci_pb2.Options()
    runc_opts.ParseFromString(options_any.value)  # type: ignore[attr-defined]
    if runc_opts.root:
        opts.root = os.path.join(runc_opts.root, namespace)
    if runc_opts.binary_name:
        opts.binary = runc_opts.binary_name
    opts.systemd_cgroup = runc_opts.systemd_cgroup
    opts.no_pivot_root = runc_opts.no_pivot_root
    opts.no_new_keyring = runc_opts.no_new_keyring
    opts.criu_image_path = runc_opts.criu_image_path
    opts.criu_work_path = runc_opts.criu_work_path
    return opts
