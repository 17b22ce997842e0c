"""What only the az:// backend does (shim.store.backends.azure), against Azurite: URL rules checked before any
request, credentials from the environment, the node's credentials file (account key or SAS) and nowhere else,
refused credentials reported at once, a missing container named, large objects as committed block lists, a
server out of space (the nearest Azure equivalent of a full disk) committing nothing."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from harness.servers import AZ_ACCOUNT, AZ_CONTAINER, AZ_KEY, Azurite, ServerHandle
from harness.store_util import MIB, make_tree, tree_digest
from shim.store import BackendUnavailable, StoreError, open_store

KEY = "default/mypod/main"
ENV = "AZURE_STORAGE_CONNECTION_STRING"


@pytest.fixture
def no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither the environment's connection string nor azure-identity (installed or not) to fall back on."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setitem(sys.modules, "azure.identity", None)  # import fails as if not installed


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("az://UPPER/ckpt", "storage account name"),
        ("az://toolongaccountname0123456789/ckpt", "storage account name"),
        ("az://acct/x", "container name"),
        ("az://acct/bad--name", "container name"),
        ("az://acct/ckpt/../escape", "prefix"),
        ("az://acct/ckpt/a%20b", "prefix"),
        ("az://acct/ckpt?endpoint=http://blob.example.com/acct", "plain http"),
        ("az://acct/ckpt?endpoint=https://blob.example.com/other", "endpoint path"),
        ("az://acct/ckpt?endpoint=https://u@blob.example.com", "endpoint must be"),
        ("az://acct/ckpt?block_mb=0", "block_mb"),
        ("az://acct/ckpt?block_mb=1000", "block_mb"),
        ("az://acct/ckpt?pack_mb=999", "pack_mb"),
        ("az://acct/ckpt?region=x", "unknown option"),
    ],
)
def test_bad_urls_are_refused_before_any_request(url: str, complaint: str, no_ambient_credentials: None) -> None:
    with pytest.raises(StoreError, match=complaint):
        open_store(url)


def test_no_credentials_fails_at_once(no_ambient_credentials: None) -> None:
    with pytest.raises(StoreError, match=f"no Azure credentials: set {ENV}"):
        open_store("az://acct/ckpt?endpoint=http://127.0.0.1:9/acct")


def test_refused_credentials_fail_at_once_without_retries(
    azure_server: ServerHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "A" * 86 + "=="  # a well-formed key that is not the account's
    monkeypatch.setenv(ENV, f"AccountName={AZ_ACCOUNT};AccountKey={wrong}")
    store = open_store(azure_server.url)
    with caplog.at_level(logging.WARNING), pytest.raises(StoreError, match="refused the credentials") as err:
        store.put(KEY, make_tree(tmp_path / "src", seed=1, big_mib=1))
    assert not isinstance(err.value, BackendUnavailable) and "attempt" not in str(err.value)
    assert not [r for r in caplog.records if "retrying" in r.getMessage()], "credential errors were retried"
    assert wrong not in caplog.text and wrong not in str(err.value)


def _sas(server: ServerHandle) -> str:
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    return generate_container_sas(
        AZ_ACCOUNT,
        AZ_CONTAINER,
        account_key=AZ_KEY,
        permission=ContainerSasPermissions(read=True, write=True, delete=True, list=True, add=True, create=True),
        expiry=datetime.now(UTC) + timedelta(hours=1),
    )


@pytest.mark.parametrize("kind", ["key", "sas"])
def test_credentials_file_from_the_node_config(
    kind: str, azure_server: ServerHandle, tmp_path: Path, no_ambient_credentials: None
) -> None:
    secret = f"AccountKey={AZ_KEY}" if kind == "key" else f"SharedAccessSignature={_sas(azure_server)}"
    creds = tmp_path / "azure.conn"
    creds.write_text(f"DefaultEndpointsProtocol=https;AccountName={AZ_ACCOUNT};{secret}\n")
    creds.chmod(0o600)
    url = f"{azure_server.url}&credentials_file={creds}"
    src = make_tree(tmp_path / "src", seed=2, big_mib=2)
    store = open_store(url)
    assert store.put(KEY, src).seq == 1
    store.get(KEY, tmp_path / "dest")
    assert tree_digest(tmp_path / "dest") == tree_digest(src)
    assert store.verify() == []


def test_credentials_file_must_exist_and_match_the_account(
    azure_server: ServerHandle, tmp_path: Path, no_ambient_credentials: None
) -> None:
    with pytest.raises(StoreError, match="No such file"):
        open_store(f"{azure_server.url}&credentials_file={tmp_path}/none")
    creds = tmp_path / "azure.conn"
    creds.write_text(f"AccountName=someoneelse;AccountKey={AZ_KEY}")
    creds.chmod(0o644)  # the account key readable by anyone on the node: refused
    with pytest.raises(StoreError, match="lets group or others in"):
        open_store(f"{azure_server.url}&credentials_file={creds}")
    creds.chmod(0o600)
    with pytest.raises(StoreError, match="for account 'someoneelse'"):
        open_store(f"{azure_server.url}&credentials_file={creds}")
    creds.write_text(f"AccountName={AZ_ACCOUNT}")
    with pytest.raises(StoreError, match="neither AccountKey nor SharedAccessSignature"):
        open_store(f"{azure_server.url}&credentials_file={creds}")
    creds.write_text("not a connection string")
    with pytest.raises(StoreError, match="not an Azure connection string"):
        open_store(f"{azure_server.url}&credentials_file={creds}")


def test_missing_container_is_named(azure_server: ServerHandle, tmp_path: Path) -> None:
    url = azure_server.url.replace(f"/{AZ_CONTAINER}/", "/no-such-container/")
    with pytest.raises(StoreError, match="container 'no-such-container' does not exist"):
        open_store(url).put(KEY, make_tree(tmp_path / "src", seed=3, big_mib=1))


def test_large_objects_are_committed_block_lists(azure_server: ServerHandle, tmp_path: Path) -> None:
    """A pack over block_mb goes up as staged blocks committed at once, and reads back whole."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "pages-1.img").write_bytes(os.urandom(10 * MIB))
    store = open_store(azure_server.url + "&block_mb=1&pack_mb=8")
    store.put(KEY, src)
    b = store.backend
    packs = [(name, size) for name, size, _ in b.list_objects("packs/") if size > 2 * MIB]
    assert packs, "no pack over the block size"
    blob = azure_server.server.client().get_container_client(AZ_CONTAINER).get_blob_client(b.prefix + packs[0][0])
    committed, uncommitted = blob.get_block_list("all")
    assert len(committed) == -(-packs[0][1] // MIB) and not uncommitted, (len(committed), packs[0][1])
    store.get(KEY, tmp_path / "dest", fallback=False)
    assert tree_digest(tmp_path / "dest") == tree_digest(src)


@pytest.fixture
def small_azurite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Azurite]:
    """A private Azurite whose data lives on a 40 MiB tmpfs: the nearest thing to a storage account that
    refuses writes (Azure itself answers a full account with 5xx or quota errors)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "revenant-test", str(mnt)], check=True)
    srv = Azurite(mnt)
    monkeypatch.setenv(ENV, srv.connection_string)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_server_out_of_space_commits_nothing(small_azurite: Azurite, tmp_path: Path) -> None:
    url = f"az://{AZ_ACCOUNT}/{AZ_CONTAINER}/full?endpoint={small_azurite.endpoint}"
    store = open_store(url)
    store.backend.retries, store.backend.backoff = 2, 0.1
    v1 = make_tree(tmp_path / "v1", seed=4, big_mib=2)
    store.put(KEY, v1)
    big = tmp_path / "big"
    big.mkdir()
    (big / "pages-1.img").write_bytes(os.urandom(64 * MIB))
    with pytest.raises(BackendUnavailable, match="failed after 2 attempts"):  # 5xx: retried, then given up
        store.put(KEY, big)
    st = os.statvfs(small_azurite.root)
    # Less room left than one staged block (block_mb, 8 MiB): the server ran out of space, not of patience.
    assert st.f_bavail * st.f_frsize < 8 * MIB, "the server's disk never filled: this test proves nothing"
    fresh = open_store(url)
    assert [i.seq for i in fresh.list(KEY)] == [1], "a put the server could not store committed"
    fresh.get(KEY, tmp_path / "dest", fallback=False)
    assert tree_digest(tmp_path / "dest") == tree_digest(v1)
    assert fresh.verify() == []


def test_debug_log_has_no_secrets(azure_server: ServerHandle, tmp_path: Path) -> None:
    """`revenant store put -v` (root logger at DEBUG) never prints the account key or a SAS signature."""
    src = make_tree(tmp_path / "src", seed=5, big_mib=1)
    exe = str(Path(sys.executable).parent / "revenant")
    sas = _sas(azure_server)
    for secret, env_value in [
        (AZ_KEY, f"AccountName={AZ_ACCOUNT};AccountKey={AZ_KEY}"),
        (sas, f"AccountName={AZ_ACCOUNT};SharedAccessSignature={sas}"),
    ]:
        p = subprocess.run(
            [exe, "store", "put", "-v", "--store", azure_server.url, "--key", KEY, str(src)],
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, AZURE_STORAGE_CONNECTION_STRING=env_value),
        )
        assert p.returncode == 0, p.stderr[-2000:]
        assert "DEBUG" in p.stderr, "the debug log is off: this test proves nothing"
        signature = secret.split("sig=")[-1].split("&")[0]
        assert secret not in p.stderr and signature not in p.stderr
        assert "SharedKey" not in p.stderr, "an Authorization header in the log"
        if secret == sas:  # request URLs are logged (urllib3), with the signature taken out
            assert "sig=<redacted>" in p.stderr
