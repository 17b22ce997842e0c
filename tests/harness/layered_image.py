"""A small two-layer OCI image for the snapshotter tests, built locally from busybox-static.

Layer 1: busybox with its applet links. Layer 2: files the writable-layer tests act on (a file to
delete so a whiteout hides it, a directory to replace so it becomes opaque, a hardlinked pair).
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
import time
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
IMAGE_REF = "localhost/revenant/snaptest:layers"


def _tar_layer(add: callable) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        add(tf)
    return buf.getvalue()


def _dir(tf: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, mode, int(time.time())
    tf.addfile(ti)


def _file(tf: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), mode, int(time.time())
    tf.addfile(ti, io.BytesIO(data))


def _busybox_layer(tf: tarfile.TarFile) -> None:
    if not BUSYBOX.exists():
        raise RuntimeError("busybox-static missing: apt-get install -y busybox-static")
    for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "root", "var"):
        _dir(tf, d, 0o1777 if d == "tmp" else 0o755)
    tf.add(str(BUSYBOX), "bin/busybox")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet == "busybox":
            continue
        ti = tarfile.TarInfo(f"bin/{applet}")
        ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, "busybox", 0o777
        tf.addfile(ti)
    _file(tf, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    _file(tf, "etc/group", b"root:x:0:\nnogroup:x:65534:\n")


def _data_layer(tf: tarfile.TarFile) -> None:
    _dir(tf, "data")
    _file(tf, "data/keep.txt", b"lower layer keeps this\n")
    _file(tf, "data/delete-me.txt", b"the container deletes this\n")
    _file(tf, "data/rename-me.txt", b"the container renames this\n")
    _dir(tf, "data/replace-dir")
    _file(tf, "data/replace-dir/old-a.txt", b"old a\n")
    _file(tf, "data/replace-dir/old-b.txt", b"old b\n")
    _dir(tf, "data/sub")
    _file(tf, "data/sub/lower.txt", b"lower file in a dir the container adds to\n")


def build_image(out: Path) -> Path:
    """Write an OCI image layout tarball to `out` (ref IMAGE_REF) and return it."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> str:
        d = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[d] = data
        return d

    layers = [_tar_layer(_busybox_layer), _tar_layer(_data_layer)]
    diff_ids = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]
    layer_descs = [
        {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": blob(layer), "size": len(layer)}
        for layer in layers
    ]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": blob(config),
                "size": len(config),
            },
            "layers": layer_descs,
        }
    ).encode()
    mdigest = blob(manifest)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": mdigest,
                    "size": len(manifest),
                    "annotations": {"org.opencontainers.image.ref.name": IMAGE_REF},
                }
            ],
        }
    ).encode()
    with tarfile.open(out, "w") as tf:
        for name, data in [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index)]:
            _file(tf, name, data)
        for d, data in blobs.items():
            _file(tf, "blobs/sha256/" + d.split(":", 1)[1], data)
    return out
