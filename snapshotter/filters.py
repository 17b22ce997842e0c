"""containerd's filter syntax (github.com/containerd/containerd/filters), the subset List needs.

    filter    := selector ( ',' selector )*         (AND)
    selector  := fieldpath [ op value ]             (no op: the field is present / non-empty)
    fieldpath := field ( '.' field )*               field: identifier or "quoted string"
    op        := '==' | '!=' | '~='                 (~= is a regular expression search)
    value     := bare word (up to ',') or "quoted" / 'quoted' string

Several filters in one request are ORed, as in containerd.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from snapshotter.metadata import InvalidArgument

# Returns (value, present) for a field path of the object being filtered.
Adaptor = Callable[[list[str]], tuple[str, bool]]


@dataclass(frozen=True)
class Selector:
    fieldpath: tuple[str, ...]
    op: str  # "" (presence), "==", "!=", "~="
    value: str

    def match(self, adapt: Adaptor) -> bool:
        value, present = adapt(list(self.fieldpath))
        if self.op == "":
            return present
        if self.op == "==":
            return present and value == self.value
        if self.op == "!=":
            return not present or value != self.value
        return present and re.search(self.value, value) is not None


Filter = list[Selector]


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, msg: str) -> InvalidArgument:
        return InvalidArgument(f"filter {self.text!r}: {msg} at position {self.pos}: invalid argument")

    def peek(self, s: str) -> bool:
        return self.text.startswith(s, self.pos)

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def quoted(self) -> str:
        quote = self.text[self.pos]
        self.pos += 1
        out = []
        while self.pos < len(self.text):
            c = self.text[self.pos]
            self.pos += 1
            if c == "\\" and self.pos < len(self.text):
                out.append(self.text[self.pos])
                self.pos += 1
            elif c == quote:
                return "".join(out)
            else:
                out.append(c)
        raise self.error("unterminated quoted string")

    def field(self) -> str:
        self.skip_space()
        if self.pos < len(self.text) and self.text[self.pos] in "\"'":
            return self.quoted()
        m = re.compile(r"[A-Za-z0-9_\-/]+").match(self.text, self.pos)
        if not m:
            raise self.error("expected a field name")
        self.pos = m.end()
        return m.group(0)

    def value(self) -> str:
        self.skip_space()
        if self.pos < len(self.text) and self.text[self.pos] in "\"'":
            return self.quoted()
        m = re.compile(r"[^,]*").match(self.text, self.pos)
        assert m is not None
        self.pos = m.end()
        v = m.group(0).strip()
        if not v:
            raise self.error("expected a value")
        return v


def parse(text: str) -> Filter:
    sc = _Scanner(text)
    selectors: Filter = []
    while True:
        path = [sc.field()]
        while sc.peek("."):
            sc.pos += 1
            path.append(sc.field())
        sc.skip_space()
        op = ""
        for candidate in ("==", "!=", "~="):
            if sc.peek(candidate):
                op = candidate
                sc.pos += 2
                break
        value = sc.value() if op else ""
        if op == "~=":
            try:
                re.compile(value)
            except re.error as e:
                raise sc.error(f"bad regular expression {value!r}: {e}") from None
        selectors.append(Selector(tuple(path), op, value))
        sc.skip_space()
        if sc.pos >= len(text):
            return selectors
        if not sc.peek(","):
            raise sc.error("expected ','")
        sc.pos += 1


def parse_all(texts: list[str]) -> list[Filter]:
    return [parse(t) for t in texts if t.strip()]


def matches(filters: list[Filter], adapt: Adaptor) -> bool:
    """No filters match everything; otherwise any filter whose selectors all match."""
    if not filters:
        return True
    return any(all(sel.match(adapt) for sel in f) for f in filters)


def snapshot_adaptor(name: str, parent: str, kind: str, labels: Mapping[str, str]) -> Adaptor:
    """Fields as containerd's adaptSnapshot exposes them: kind is "active", "view" or "committed";
    name and parent always count as present; labels.<key> (dots rejoined) present when set."""

    def adapt(path: list[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "name":
            return name, True
        if head == "parent":
            return parent, True
        if head == "kind":
            return kind.lower(), kind != "Unknown"
        if head == "labels" and len(path) >= 2:
            key = ".".join(path[1:])
            return labels.get(key, ""), key in labels
        return "", False

    return adapt
