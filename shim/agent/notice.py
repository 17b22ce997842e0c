"""What every notice watcher returns, and the interface it implements."""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Any

# Every other action ends the instance: the final checkpoint stops the task (exit=true).
# Advisory: the instance is at elevated risk; a leave-running checkpoint narrows the loss if it goes.
ADVISORY_ACTIONS = frozenset({"rebalance"})


class MetadataError(Exception):
    """The metadata service could not be reached or answered something unexpected."""


@dataclass(frozen=True)
class Notice:
    provider: str  # "aws", "gcp", "azure"
    action: str  # "terminate", "stop", "hibernate", "preempt" or "rebalance"
    deadline: float  # wall-clock epoch seconds by which the instance may be gone
    raw: Any  # the provider's document, as received (parsed JSON or text)
    id: str = ""  # stable across polls of the same notice, so the agent acts once per notice
    details: dict[str, Any] = field(default_factory=dict)  # provider data the watcher needs later (Azure EventId)

    @property
    def advisory(self) -> bool:
        return self.action in ADVISORY_ACTIONS

    @property
    def exit(self) -> bool:
        """Whether the checkpoint triggered by this notice stops the task."""
        return not self.advisory

    def seconds_left(self, now: float | None = None) -> float:
        return self.deadline - (time.time() if now is None else now)

    def describe(self) -> str:
        return f"{self.provider} {self.action}"


class Watcher(abc.ABC):
    """Polls one provider's metadata service for interruption notices."""

    provider: str = ""
    # True when poll() itself waits for a change (long-poll); the daemon then polls back-to-back.
    long_poll: bool = False

    @abc.abstractmethod
    def poll(self) -> Notice | None:
        """The current notice, or None. Raises MetadataError when the service cannot answer."""

    def acknowledge(self, notice: Notice) -> None:  # noqa: B027 - most providers need no acknowledgement
        """Tell the provider the node is ready (after the checkpoints finished); a no-op by default."""
