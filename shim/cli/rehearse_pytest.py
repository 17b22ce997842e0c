"""pytest plugin: rehearse spot losses of your job from your own test suite, on testcontainers-python.

Installed with revenant (entry point `pytest11`), so in a repository with `pip install revenant[rehearse]`:

    def test_my_job_survives(revenant_rehearsal):
        report = revenant_rehearsal("registry.example/trainer:1", ["python", "train.py"],
                                    interruptions=3, progress_file="/ckpt/step")
        assert report.ok, report

The container runs with revenant's runtime on the Docker daemon testcontainers finds (DOCKER_HOST);
each interruption takes a final checkpoint through the shim, removes the container and creates it again.
Ryuk (testcontainers' reaper container) is not needed: the rehearsal removes its own containers, so it
is disabled unless TESTCONTAINERS_RYUK_DISABLED says otherwise. Images must be on the daemon already.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    import pytest
except ImportError:  # revenant installed without pytest: there is nothing to plug into, and no fixture
    pytest = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from .rehearsal import RehearsalReport

# Loaded by every pytest run where revenant is installed: the rest is imported when the fixture is used.


def _testcontainers() -> Any:
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")  # before testcontainers reads its config
    try:
        from testcontainers.core.container import DockerContainer
    except ImportError as e:  # pragma: no cover - the message is the point
        raise pytest.UsageError("revenant_rehearsal needs testcontainers: pip install 'revenant[rehearse]'") from e
    return DockerContainer


def revenant_container(image: str, command: Sequence[str], annotations: dict[str, str], network: str) -> Any:
    """A testcontainers DockerContainer that runs with revenant's runtime and OCI annotations (docker-py
    has no `annotations` argument: the container is created through its low-level API)."""
    from .rehearsal import RUNTIME

    DockerContainer = _testcontainers()

    class RevenantContainer(DockerContainer):  # type: ignore[misc, valid-type]
        def start(self) -> RevenantContainer:
            client = self.get_docker_client().client
            host_config = client.api.create_host_config(runtime=RUNTIME, network_mode=network)
            host_config["Annotations"] = dict(annotations)  # Docker API >= 1.43
            created = client.api.create_container(image, command=list(command), host_config=host_config)
            self._container = client.containers.get(created["Id"])
            self._container.start()
            return self

    return RevenantContainer(image)


@dataclass
class TestcontainersEngine:
    """rehearsal.Engine over testcontainers-python."""

    network: str = "none"
    namespace: str = "moby"
    _containers: dict[str, Any] = field(default_factory=dict)

    def run(self, name: str, image: str, annotations: dict[str, str], command: Sequence[str]) -> str:
        container = revenant_container(image, command, annotations, self.network).start()
        cid = container.get_wrapped_container().id
        self._containers[cid] = container
        return cid

    def exec(self, cid: str, argv: Sequence[str]) -> tuple[int, str]:
        code, output = self._containers[cid].exec(list(argv))
        return int(code), (output or b"").decode(errors="replace")

    def running(self, cid: str) -> bool:
        container = self._containers.get(cid)
        if container is None:
            return False
        try:
            container.get_wrapped_container().reload()
        except Exception:  # gone
            return False
        return container.get_wrapped_container().status == "running"

    def remove(self, cid: str) -> None:
        container = self._containers.pop(cid, None)
        if container is not None:
            container.stop(force=True, delete_volume=True)


def _revenant_rehearsal() -> Iterator[Callable[..., RehearsalReport]]:
    """revenant_rehearsal(image, command, *, interruptions=3, min_s=2, max_s=8, seed=None,
    health_cmd=None, progress_file=None, store=None, run_dir=None, network="none") -> RehearsalReport"""
    stores: list[tempfile.TemporaryDirectory[str]] = []

    def rehearse(
        image: str,
        command: Sequence[str],
        *,
        interruptions: int = 3,
        min_s: float = 2.0,
        max_s: float = 8.0,
        seed: int | None = None,
        health_cmd: str | None = None,
        progress_file: str | None = None,
        store: str | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        network: str = "none",
    ) -> RehearsalReport:
        from shim.protect.registry import default_run_dir

        from .rehearsal import Rehearsal, RehearsalPlan

        if store is None:
            tmp = tempfile.TemporaryDirectory(prefix="revenant-rehearse-")
            stores.append(tmp)
            store = f"file://{tmp.name}"
        plan = RehearsalPlan(
            image=image,
            command=list(command),
            store=store,
            run_dir=Path(run_dir) if run_dir else default_run_dir(),
            interruptions=interruptions,
            min_s=min_s,
            max_s=max_s,
            seed=seed,
            health_cmd=health_cmd,
            progress_file=progress_file,
        )
        return Rehearsal(TestcontainersEngine(network=network), plan, engine_name="testcontainers").run()

    yield rehearse
    for tmp in stores:
        tmp.cleanup()


if pytest is not None:
    revenant_rehearsal = pytest.fixture(_revenant_rehearsal, name="revenant_rehearsal")
