"""Test images built locally (no registry, no network): busybox and memjob as OCI layout tarballs."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .tools import require

BUSYBOX_REF = "localhost/revenant/busybox:test"
MEMJOB_REF = "localhost/revenant/memjob:test"
PAUSE_REF = "localhost/revenant/pause:test"
MEMJOB_SOURCE = Path(__file__).resolve().parent.parent / "images" / "memjob.c"
PAUSE_SOURCE = Path(__file__).resolve().parent.parent / "images" / "pause.c"
DIRS = ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "etc", "var/log", "root", "data")


@dataclass(frozen=True)
class TestImages:
    busybox: Path
    memjob: Path
    memjob_binary: Path  # the same static binary, runnable on the host for `--replay`
    busybox_ref: str = BUSYBOX_REF
    memjob_ref: str = MEMJOB_REF


def _tar_add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    tar.addfile(info, io.BytesIO(data))


def _tar_add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, 0
    tar.addfile(info)


def _tar_add_symlink(tar: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime, info.mode = tarfile.SYMTYPE, target, 0, 0o777
    tar.addfile(info)


def _rootfs_layer(extra_files: dict[str, tuple[bytes, int]]) -> bytes:
    busybox = Path(require("busybox", "busybox-static"))
    applets = subprocess.run([str(busybox), "--list-full"], check=True, capture_output=True, text=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in DIRS:
            _tar_add_dir(tar, d, 0o1777 if d == "tmp" else 0o755)
        _tar_add_bytes(tar, "bin/busybox", busybox.read_bytes(), 0o755)
        for applet in sorted(set(applets.stdout.split())):
            if applet != "bin/busybox":
                _tar_add_symlink(tar, applet, "/bin/busybox")
        _tar_add_bytes(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        _tar_add_bytes(tar, "etc/group", b"root:x:0:\n")
        for name, (data, mode) in sorted(extra_files.items()):
            _tar_add_bytes(tar, name, data, mode)
    return buf.getvalue()


def _blob(blobs: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def write_oci_archive(out: Path, ref: str, layer: bytes, cmd: list[str]) -> Path:
    """Write an OCI image layout tarball that `ctr images import` accepts, named `ref`."""
    work = out.with_suffix(".d")
    shutil.rmtree(work, ignore_errors=True)
    blobs = work / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    layer_desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar", **_blob(blobs, layer)}
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": cmd, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
    }
    config_desc = {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        **_blob(blobs, json.dumps(config, sort_keys=True).encode()),
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": [layer_desc],
    }
    manifest_desc = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        **_blob(blobs, json.dumps(manifest, sort_keys=True).encode()),
        "annotations": {
            "io.containerd.image.name": ref,
            "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1],
        },
        "platform": {"architecture": "amd64", "os": "linux"},
    }
    (work / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest_desc]}))
    (work / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    with tarfile.open(out, "w") as tar:
        for name in ("oci-layout", "index.json", "blobs"):
            tar.add(work / name, arcname=name)
    shutil.rmtree(work)
    return out


def extract_rootfs(archive: Path, dest: Path) -> Path:
    """Unpack the single layer of an archive written by write_oci_archive into `dest` (a runc rootfs)."""
    with tarfile.open(archive) as outer:

        def blob(digest: str) -> bytes:
            member = outer.extractfile(f"blobs/sha256/{digest.split(':', 1)[1]}")
            if member is None:
                raise ValueError(f"{archive}: blob {digest} missing")
            return member.read()

        index = json.loads(blob_of_index(outer))
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        (layer,) = manifest["layers"]
        with tarfile.open(fileobj=io.BytesIO(blob(layer["digest"]))) as inner:
            inner.extractall(dest, filter="tar")
    return dest


def blob_of_index(outer: tarfile.TarFile) -> bytes:
    member = outer.extractfile("index.json")
    if member is None:
        raise ValueError("archive has no index.json")
    return member.read()


def build_memjob(out_dir: Path) -> Path:
    """Compile memjob statically so it runs in a busybox image and on the host alike."""
    gcc = require("gcc", "gcc libc6-dev")
    binary = out_dir / "memjob"
    subprocess.run([gcc, "-static", "-O2", "-Wall", "-o", str(binary), str(MEMJOB_SOURCE)], check=True)
    return binary


def build_test_images(out_dir: Path) -> TestImages:
    out_dir.mkdir(parents=True, exist_ok=True)
    memjob = build_memjob(out_dir)
    busybox_tar = write_oci_archive(out_dir / "busybox.tar", BUSYBOX_REF, _rootfs_layer({}), ["/bin/sh"])
    memjob_layer = _rootfs_layer({"bin/memjob": (memjob.read_bytes(), 0o755)})
    memjob_tar = write_oci_archive(out_dir / "memjob.tar", MEMJOB_REF, memjob_layer, ["/bin/memjob"])
    return TestImages(busybox=busybox_tar, memjob=memjob_tar, memjob_binary=memjob)


def build_pause_image(out_dir: Path) -> Path:
    """The pod sandbox image CRI runs as each pod's first container (its `sandbox_image`): one static
    binary that sleeps until SIGTERM/SIGINT. Built here because nothing can be pulled."""
    gcc = require("gcc", "gcc libc6-dev")
    out_dir.mkdir(parents=True, exist_ok=True)
    binary = out_dir / "pause"
    subprocess.run([gcc, "-static", "-O2", "-Wall", "-o", str(binary), str(PAUSE_SOURCE)], check=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("dev", "proc", "sys", "etc"):
            _tar_add_dir(tar, d)
        _tar_add_bytes(tar, "pause", binary.read_bytes(), 0o755)
    return write_oci_archive(out_dir / "pause.tar", PAUSE_REF, buf.getvalue(), ["/pause"])
