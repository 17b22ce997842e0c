"""Fixtures for the shim scenarios: every scenario runs against the stock runc shim (parity
reference) and revenant's shim."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from harness.containerd import ContainerdNode

RUNC_SHIM = "io.containerd.runc.v2"
REVENANT_SHIM = "io.containerd.revenant.v1"


@dataclass
class Runtime:
    """A containerd node plus the runtime under test, with `ctr run` / `ctr task` helpers."""

    node: ContainerdNode
    name: str
    image: str

    @property
    def is_revenant(self) -> bool:
        return self.name == REVENANT_SHIM

    def run_flags(self) -> list[str]:
        flags = ["--runtime", self.name]
        if not self.is_revenant:
            # runc's default root is per machine; keep the stock shim's state inside this node
            flags += ["--runc-root", str(self.node.runc_root)]
        return flags

    def run(
        self,
        cid: str,
        *cmd: str,
        flags: tuple[str, ...] = (),
        check: bool = True,
        timeout: float = 120,
        input: str | None = "",
    ):
        return self.node.ctr(
            "run", *self.run_flags(), *flags, self.image, cid, *cmd, check=check, timeout=timeout, input=input
        )

    def ctr(self, *args: str, **kwargs):
        kwargs.setdefault("input", "")  # never hand ctr the test runner's own stdin
        return self.node.ctr(*args, **kwargs)


@pytest.fixture(params=[RUNC_SHIM, REVENANT_SHIM], ids=["runc-shim", "revenant-shim"])
def runtime(request: pytest.FixtureRequest, containerd_node: ContainerdNode, test_images) -> Runtime:
    image = containerd_node.import_image(test_images.busybox)
    return Runtime(containerd_node, request.param, image)
