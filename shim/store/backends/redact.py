"""Keeping credentials out of debug logs: HTTP libraries log request URLs, headers and signing steps."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable


class RedactSecrets(logging.Filter):
    """Replaces the value after each pattern's first group with `<redacted>` before any handler sees it."""

    def __init__(self, patterns: Iterable[re.Pattern[str]]) -> None:
        super().__init__()
        self.patterns = tuple(patterns)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a record that cannot render is left to the handler to report
            return True
        redacted = msg
        for pattern in self.patterns:
            redacted = pattern.sub(r"\1<redacted>", redacted)
        if redacted != msg:
            record.msg, record.args = redacted, None
        return True


def install(redactor: RedactSecrets, names: Iterable[str]) -> None:
    """Add redactor to each named logger (a filter acts only on records logged to its own logger, so every
    module logger that prints secrets is named)."""
    for name in names:
        lg = logging.getLogger(name)
        if redactor not in lg.filters:
            lg.addFilter(redactor)
