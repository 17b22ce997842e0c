"""containerd filter syntax: parsing and matching (pure functions)."""

from __future__ import annotations

import pytest

from snapshotter.filters import Selector, matches, parse, parse_all, snapshot_adaptor
from snapshotter.metadata import InvalidArgument


def adapt(name: str = "n", parent: str = "", kind: str = "Active", labels: dict[str, str] | None = None):
    return snapshot_adaptor(name, parent, kind, labels or {})


def test_parse_forms() -> None:
    assert parse("name==a") == [Selector(("name",), "==", "a")]
    assert parse(' labels."a.b/c" == "x,y" , kind!=view') == [
        Selector(("labels", "a.b/c"), "==", "x,y"),
        Selector(("kind",), "!=", "view"),
    ]
    assert parse("labels.team") == [Selector(("labels", "team"), "", "")]
    assert parse(r'name=="a\"b"') == [Selector(("name",), "==", 'a"b')]
    assert parse("name~=^sha256:") == [Selector(("name",), "~=", "^sha256:")]


@pytest.mark.parametrize("bad", ["", "==a", "name==", 'name=="unterminated', "name~=("])
def test_parse_errors(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        parse(bad)


def test_matching() -> None:
    a = adapt(labels={"team": "red", "x.y": "1"})
    assert matches([], a)
    assert matches(parse_all(["kind==active"]), a)
    assert not matches(parse_all(["kind==Active"]), a)
    assert matches(parse_all(['labels."x.y"==1']), a)
    assert matches(parse_all(["labels.x.y==1"]), a)  # dotted path re-joined, as containerd does
    assert matches(parse_all(["kind==view", "labels.team==red"]), a)  # OR across filters
    assert not matches(parse_all(["kind==view,labels.team==red"]), a)  # AND within one
    assert matches(parse_all(["parent!=x"]), a) and matches(parse_all(["parent"]), a)
    assert not matches(parse_all(["labels.missing"]), a)
    assert matches(parse_all(["labels.missing!=v"]), a)
