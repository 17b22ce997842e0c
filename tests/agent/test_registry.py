"""The node registry (shim.protect.registry): round trips, atomic rewrites, and readers that survive bad files."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest

from shim.protect.registry import (
    LastCheckpoint,
    TaskRecord,
    is_live,
    list_tasks,
    read_task,
    remove_task,
    task_path,
    write_task,
)


def record(id: str = "job", namespace: str = "default", **kw: object) -> TaskRecord:
    base: dict = dict(namespace=namespace, id=id, address=f"unix:///run/containerd/s/{id}", key=f"{namespace}/p/{id}")
    base.update(kw)
    return TaskRecord(**base)


def test_round_trip_matches_the_contract_layout(tmp_path: Path) -> None:
    rec = record(
        store="file:///var/lib/revenant/store",
        interval_s=600,
        checkpoint_on_stop=True,
        keep=3,
        shim_pid=1234,
        task_pid=5678,
        last_checkpoint=LastCheckpoint(seq=4, time=1764180000.5, bytes_uploaded=123, duration_s=2.1),
    )
    path = write_task(tmp_path, rec)
    assert path == tmp_path / "tasks" / "default" / "job.json"
    doc = json.loads(path.read_text())
    assert doc == {
        "namespace": "default",
        "id": "job",
        "address": "unix:///run/containerd/s/job",
        "key": "default/p/job",
        "store": "file:///var/lib/revenant/store",
        "interval_s": 600,
        "checkpoint_on_stop": True,
        "keep": 3,
        "shim_pid": 1234,
        "task_pid": 5678,
        "last_checkpoint": {"seq": 4, "time": 1764180000.5, "bytes_uploaded": 123, "duration_s": 2.1},
        "last_error": None,
    }
    assert list_tasks(tmp_path) == [rec]


def test_a_kubernetes_record_names_its_pod(tmp_path: Path) -> None:
    rec = record("c1", "k8s.io", pod="trainer-0", pod_namespace="ml", container="main")
    doc = json.loads(write_task(tmp_path, rec).read_text())
    assert (doc["pod"], doc["pod_namespace"], doc["container"]) == ("trainer-0", "ml", "main")
    assert list_tasks(tmp_path) == [rec]


def test_listing_is_sorted_across_namespaces_and_rewrites_replace(tmp_path: Path) -> None:
    write_task(tmp_path, record("b", "ns2"))
    write_task(tmp_path, record("a", "ns2"))
    write_task(tmp_path, record("z", "default"))
    write_task(tmp_path, record("z", "default", last_error="store unreachable"))
    assert [(r.namespace, r.id) for r in list_tasks(tmp_path)] == [("default", "z"), ("ns2", "a"), ("ns2", "b")]
    assert list_tasks(tmp_path)[0].last_error == "store unreachable"
    # No temporary file is left behind by the atomic rewrite.
    assert sorted(p.name for p in (tmp_path / "tasks" / "default").iterdir()) == ["z.json"]


def test_missing_run_dir_lists_nothing(tmp_path: Path) -> None:
    assert list_tasks(tmp_path / "absent") == []


def test_remove_is_idempotent(tmp_path: Path) -> None:
    write_task(tmp_path, record())
    assert remove_task(tmp_path, "default", "job") is True
    assert remove_task(tmp_path, "default", "job") is False
    assert list_tasks(tmp_path) == []


def test_half_written_and_malformed_files_are_skipped_with_a_warning(tmp_path: Path, caplog) -> None:
    write_task(tmp_path, record("good"))
    ns = tmp_path / "tasks" / "default"
    (ns / "half.json").write_text('{"namespace": "default", "id": "half", "addr')
    (ns / "empty.json").write_text("")
    (ns / "nokey.json").write_text(json.dumps({"namespace": "default", "id": "nokey", "address": "unix:///x"}))
    (ns / "list.json").write_text("[1, 2]")
    (ns / "badseq.json").write_text(json.dumps({**record("badseq").to_dict(), "last_checkpoint": {"seq": "x"}}))
    (ns / "other.json").write_text(record("someone-else").to_json())  # names another task: not trusted
    (ns / ".good.abc.tmp").write_text("{")  # a writer's temporary file
    (ns / "notes.txt").write_text("not a record")
    with caplog.at_level(logging.WARNING, logger="shim.protect.registry"):
        tasks = list_tasks(tmp_path)
    assert [t.id for t in tasks] == ["good"]
    warned = caplog.text
    for name in ("half.json", "empty.json", "nokey.json", "list.json", "badseq.json", "other.json"):
        assert name in warned
    assert ".good.abc.tmp" not in warned


def test_a_file_that_vanishes_while_listing_is_skipped(tmp_path: Path, caplog) -> None:
    path = write_task(tmp_path, record())
    path.unlink()
    with caplog.at_level(logging.WARNING, logger="shim.protect.registry"):
        assert read_task(path) is None
    assert "vanished" in caplog.text


def test_listing_never_crashes_while_records_come_and_go(tmp_path: Path) -> None:
    write_task(tmp_path, record("steady"))
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            write_task(tmp_path, record(f"t{i % 5}", last_checkpoint=LastCheckpoint(seq=i, time=float(i))))
            remove_task(tmp_path, "default", f"t{(i + 2) % 5}")
            i += 1

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(300):
            ids = [t.id for t in list_tasks(tmp_path)]
            assert "steady" in ids
    finally:
        stop.set()
        thread.join()


def test_unknown_fields_from_a_newer_shim_survive_a_rewrite(tmp_path: Path) -> None:
    path = task_path(tmp_path, "default", "job")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**record().to_dict(), "gpu": {"devices": [0]}}))
    rec = list_tasks(tmp_path)[0]
    write_task(tmp_path, rec)
    assert json.loads(path.read_text())["gpu"] == {"devices": [0]}


@pytest.mark.parametrize("namespace,id", [("default", "../escape"), ("..", "job"), ("default", ""), ("a/b", "c")])
def test_names_that_are_not_containerd_identifiers_are_refused(tmp_path: Path, namespace: str, id: str) -> None:
    with pytest.raises(ValueError):
        write_task(tmp_path, record(id, namespace))
    with pytest.raises(ValueError):
        remove_task(tmp_path, namespace, id)


def test_last_checkpoint_may_be_given_in_its_json_shape(tmp_path: Path) -> None:
    rec = record(last_checkpoint={"seq": 2, "time": 5.0, "bytes_uploaded": 9, "duration_s": 0.5})
    assert rec.last_checkpoint == LastCheckpoint(seq=2, time=5.0, bytes_uploaded=9, duration_s=0.5)
    write_task(tmp_path, rec)
    assert list_tasks(tmp_path)[0].last_checkpoint.seq == 2


def test_liveness_of_a_record(tmp_path: Path) -> None:
    """A key's claim holds while the record's shim and task live and the task has not exited."""
    import os
    import subprocess

    child = subprocess.Popen(["sleep", "30"])
    try:
        live = TaskRecord("k8s.io", "c1", "unix:///x", "ml/k", shim_pid=os.getpid(), task_pid=child.pid)
        assert is_live(live) and not live.exited
        exited = TaskRecord.from_dict({**live.to_dict(), "exited_at": 1.5})
        assert exited.exited and not is_live(exited)
        assert not is_live(TaskRecord("k8s.io", "c1", "unix:///x", "ml/k", shim_pid=os.getpid(), task_pid=2**22 + 7))
    finally:
        child.kill()
        child.wait()
    assert not is_live(TaskRecord("k8s.io", "c1", "unix:///x", "ml/k", shim_pid=child.pid, task_pid=0)), "dead shim"
