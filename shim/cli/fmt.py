"""Formatting shared by the CLI's tables."""

from __future__ import annotations


def human_size(n: int | None) -> str:
    """Bytes as people read them: `512 B`, `3.4 MiB`; `-` when unknown."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
