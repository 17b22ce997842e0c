"""Which runc a container uses and where runc keeps its state.

The root comes from containerd.runc.v1 Options.root when the client sent one; otherwise it is derived
from the bundle path, so two private containerd instances never share runc state (runc's default,
/run/containerd/runc, is per machine): <state>/io.containerd.runtime.v2.task/<ns>/<id> ->
<state>/revenant/runc/<ns>. The choice is saved in the bundle so the `delete` action, which runs after
the shim is gone, finds the same root.
"""

from __future__ import annotations

import os

OPTIONS_FILE = "revenant-options"  # key=value lines: the `delete` action reads it without json (re)
OPTIONS_TYPE = "containerd.runc.v1.Options"


class RuntimeOptions:
    """A plain class, not a dataclass: the `delete` action loads it and dataclasses' import (inspect)
    would be most of that action's cost."""

    FIELDS = (
        "root",
        "binary",
        "systemd_cgroup",
        "no_pivot_root",
        "no_new_keyring",
        "criu_image_path",
        "criu_work_path",
    )

    def __init__(
        self,
        root: str,
        binary: str = "runc",
        systemd_cgroup: bool = False,
        no_pivot_root: bool = False,
        no_new_keyring: bool = False,
        criu_image_path: str = "",
        criu_work_path: str = "",
    ) -> None:
        self.root, self.binary, self.systemd_cgroup = root, binary, systemd_cgroup
        self.no_pivot_root, self.no_new_keyring = no_pivot_root, no_new_keyring
        self.criu_image_path, self.criu_work_path = criu_image_path, criu_work_path

    def __repr__(self) -> str:
        return f"RuntimeOptions({', '.join(f'{k}={getattr(self, k)!r}' for k in self.FIELDS)})"

    def save(self, bundle: str) -> None:
        lines = []
        for key in self.FIELDS:
            value = str(getattr(self, key))
            if "\n" in value:
                raise ValueError(f"runtime option {key} must not contain a newline: {value!r}")
            lines.append(f"{key}={value}\n")
        path = os.path.join(bundle, OPTIONS_FILE)
        with open(path + ".tmp", "w") as f:
            f.write("".join(lines))
        os.replace(path + ".tmp", path)

    @classmethod
    def load(cls, bundle: str) -> RuntimeOptions | None:
        try:
            with open(os.path.join(bundle, OPTIONS_FILE)) as f:
                pairs = [line.rstrip("\n").partition("=") for line in f]
        except OSError:
            return None
        values: dict[str, object] = {k: v for k, _, v in pairs if k in cls.FIELDS}
        if "root" not in values:
            return None
        for key in ("systemd_cgroup", "no_pivot_root", "no_new_keyring"):
            if key in values:
                values[key] = values[key] == "True"
        return cls(**values)  # type: ignore[arg-type]


def default_root(bundle: str, namespace: str) -> str:
    # <state>/io.containerd.runtime.v2.task/<ns>/<id>
    state = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(bundle))))
    return os.path.join(state, "revenant", "runc", namespace)


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
