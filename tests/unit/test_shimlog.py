"""The shim's log: containerd's `-debug` turns on the shim's debug lines, not every storage client request."""

from __future__ import annotations

import logging
import os

import pytest

from shim.daemon import shimlog


@pytest.fixture
def log_pipe():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, {n: logging.getLogger(n).level for n in shimlog.STORE_CLIENT_LOGGERS})
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        yield r, w
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)
        os.close(r)
        os.close(w)


def written(r: int) -> str:
    try:
        return os.read(r, 1 << 20).decode()
    except BlockingIOError:
        return ""


def test_debug_keeps_storage_clients_at_info(log_pipe, monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = log_pipe
    monkeypatch.delenv(shimlog.DEBUG_STORE_CLIENTS_ENV, raising=False)
    shimlog.setup(w, True, {"namespace": "ns"})
    logging.getLogger("shim.protect.checkpointer").debug("our debug line")
    logging.getLogger("botocore.endpoint").debug("Sending http request: <AWSPreparedRequest ...>")
    logging.getLogger("urllib3.connectionpool").debug("http://127.0.0.1:1 PUT /bucket/packs/ab")
    logging.getLogger("botocore.endpoint").warning("a client warning still shows")
    out = written(r)
    assert "our debug line" in out and "level=debug" in out
    assert "Sending http request" not in out and "PUT /bucket" not in out
    assert "a client warning still shows" in out


def test_the_clients_debug_lines_on_request(log_pipe, monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = log_pipe
    monkeypatch.setenv(shimlog.DEBUG_STORE_CLIENTS_ENV, "1")
    shimlog.setup(w, True, {"namespace": "ns"})
    logging.getLogger("botocore.endpoint").debug("Sending http request")
    assert "Sending http request" in written(r)


def test_without_debug_nothing_below_info(log_pipe, monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = log_pipe
    monkeypatch.setenv(shimlog.DEBUG_STORE_CLIENTS_ENV, "1")  # asks for client debug, but the shim is not in debug
    shimlog.setup(w, False, {"namespace": "ns"})
    logging.getLogger("shim.task").debug("hidden")
    logging.getLogger("botocore.endpoint").debug("hidden too")
    logging.getLogger("shim.task").info("shown")
    out = written(r)
    assert "hidden" not in out and "shown" in out
