"""The agent daemon end to end in-process: metadata server -> notice -> concurrent Checkpoint calls on the
stand-in shims (see conftest.py: real ttrpc servers implementing revenant.v1.Control per the contract,
standing in for the real shim) -> acknowledgement, metrics and health over real HTTP."""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.error
import urllib.request

import pytest

from harness.wait import wait_until
from shim.agent.aws import AwsWatcher
from shim.agent.azure import AzureWatcher
from shim.agent.daemon import Agent
from shim.agent.gcp import GcpWatcher
from shim.protect.registry import LastCheckpoint, write_task

SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? \S+$')


def get(agent: Agent, path: str) -> tuple[int, str]:
    host, port = agent.server.address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def agents():
    started: list[Agent] = []

    def make(run_dir, watcher, **kw) -> Agent:
        agent = Agent(run_dir, watcher, listen=("127.0.0.1", 0), **kw)
        agent.start()
        started.append(agent)
        return agent

    yield make
    for agent in started:
        agent.stop()


def test_aws_notice_checkpoints_every_task_once_and_shows_in_metrics(metadata_server, standins, run_dir, agents):
    srv = metadata_server(("aws",))
    a, b = standins.add("job-a"), standins.add("job-b")
    bad = standins.add("job-bad", behavior="fail")
    agent = agents(run_dir, AwsWatcher(srv.url), poll_interval=0.1)
    assert get(agent, "/healthz")[0] == 200
    notice_deadline = srv.aws_terminate(10)

    wait_until(lambda: agent.reports, 20, "the drain report", interval=0.05)
    assert time.time() < notice_deadline
    report = agent.reports[0]
    assert {r.id: r.status for r in report.results} == {"job-a": "ok", "job-b": "ok", "job-bad": "failed"}
    assert all(s.calls[0].request.exit for s in (a, b, bad))
    assert "aws terminate" in a.calls[0].request.reason

    # The notice stays visible on every poll; the agent acts on it only once.
    polls = len(srv.requests_to("/latest/meta-data/spot/instance-action"))
    wait_until(
        lambda: len(srv.requests_to("/latest/meta-data/spot/instance-action")) >= polls + 5,
        20,
        "more polls",
        interval=0.05,
    )
    assert len(agent.reports) == 1 and len(a.calls) == 1

    status, text = get(agent, "/metrics")
    assert status == 200
    for line in text.splitlines():
        assert line.startswith("# ") or SAMPLE.match(line), f"bad exposition line {line!r}"
    assert 'revenant_agent_notices_total{provider="aws",action="terminate"} 1' in text
    assert 'revenant_agent_checkpoints_total{trigger="terminate",result="ok"} 2' in text
    assert 'revenant_agent_checkpoint_failures_total{trigger="terminate",result="failed"} 1' in text
    assert 'revenant_agent_checkpoint_duration_seconds_count{trigger="terminate"} 2' in text
    assert 'revenant_agent_checkpoint_duration_seconds_bucket{trigger="terminate",le="+Inf"} 2' in text
    assert 'revenant_agent_checkpoint_bytes_uploaded_total{trigger="terminate"} 8192' in text
    assert "revenant_protected_tasks 3" in text
    assert re.search(
        r'revenant_task_last_checkpoint_age_seconds\{namespace="default",id="job-a",'
        r'key="default/pod-job-a/main"\} \S+',
        text,
    )
    assert 'revenant_task_last_checkpoint_seq{namespace="default",id="job-b",key="default/pod-job-b/main"} 1' in text
    assert 'id="job-bad"' not in text.split("revenant_task_last_checkpoint_age_seconds", 1)[1].split("# HELP")[0]
    health = json.loads(get(agent, "/healthz")[1])
    assert health["status"] == "ok" and health["provider"] == "aws" and health["last_drain"]["ok"] is False


def test_hung_shim_does_not_delay_the_report_past_the_deadline(
    metadata_server, standins, run_dir, agents, caplog: pytest.LogCaptureFixture
):
    srv = metadata_server(("aws",))
    standins.add("job")
    standins.add("stuck", behavior="hang")
    caplog.set_level(logging.INFO, logger="shim.progress")
    agent = agents(run_dir, AwsWatcher(srv.url), poll_interval=0.1, progress_interval=0.5)
    notice_deadline = srv.aws_terminate(5)
    wait_until(lambda: agent.reports, 20, "the drain report", interval=0.05)
    assert time.time() < notice_deadline
    assert {r.id: r.status for r in agent.reports[0].results} == {"job": "ok", "stuck": "timed_out"}
    # While it waited, the log said so every 0.5 s: tasks answered and time left, no invented bytes.
    progress = [r.fields for r in caplog.records if r.name == "shim.progress"]  # type: ignore[attr-defined]
    assert len(progress) >= 3, progress
    assert all(p["label"] == "drain" and p["phase"] == "checkpointing" and "done_bytes" not in p for p in progress)
    assert progress[-1]["detail"].startswith("1/2 tasks answered, deadline in "), progress


def test_azure_preempt_is_acknowledged_after_the_checkpoints(metadata_server, standins, run_dir, agents):
    srv = metadata_server(("azure",))
    srv.timeline = standins.timeline  # one ordered log for checkpoints and the acknowledgement
    standins.add("job-a")
    standins.add("job-b")
    srv.azure_add_event("Freeze", in_s=60)
    agent = agents(run_dir, AzureWatcher(srv.url), poll_interval=0.1)
    event = srv.azure_add_event("Preempt", in_s=20)
    wait_until(lambda: srv.state.azure_acks, 20, "the acknowledgement", interval=0.05)
    assert srv.state.azure_acks == [{"StartRequests": [{"EventId": event["EventId"]}]}]
    assert sorted(standins.timeline[:2]) == [
        "checkpointed default/job-a exit=True",
        "checkpointed default/job-b exit=True",
    ]
    assert standins.timeline[2:] == [f"azure-ack {event['EventId']}"]
    assert agent.reports[0].ok


def test_rebalance_takes_a_leave_running_checkpoint_then_terminate_a_final_one(
    metadata_server, standins, run_dir, agents
):
    srv = metadata_server(("aws",))
    shim = standins.add("job")
    agent = agents(run_dir, AwsWatcher(srv.url), poll_interval=0.1)
    srv.aws_rebalance_now()
    wait_until(lambda: len(agent.reports) == 1, 20, "the rebalance drain", interval=0.05)
    assert [c.request.exit for c in shim.calls] == [False]
    srv.aws_terminate(20)
    wait_until(lambda: len(agent.reports) == 2, 20, "the terminate drain", interval=0.05)
    assert [c.request.exit for c in shim.calls] == [False, True]
    assert "rebalance" in shim.calls[0].request.reason


def test_gcp_long_poll_agent_and_prompt_stop(metadata_server, standins, run_dir, agents):
    srv = metadata_server(("gcp",))
    shim = standins.add("job")
    agent = agents(run_dir, GcpWatcher(srv.url, long_poll_timeout_s=60, notice_window_s=10), poll_interval=0.1)
    assert srv.wait_until(lambda st: st.gcp_waiting == 1), "the agent never long-polled"
    srv.gcp_set_preempted(True)
    wait_until(lambda: agent.reports, 20, "the drain report", interval=0.05)
    assert agent.reports[0].ok and shim.calls[0].request.exit
    # Stopping does not wait out a long-poll held open by the metadata server.
    assert srv.wait_until(lambda st: st.gcp_waiting == 1)
    start = time.monotonic()
    agent.stop()
    assert time.monotonic() - start < 30  # the held long-poll would last 60 s


def test_health_turns_unhealthy_when_the_metadata_service_stops_answering(run_dir, agents):
    agent = agents(run_dir, AwsWatcher("http://127.0.0.1:1", timeout=0.2), poll_interval=0.1, stale_after_s=0.5)
    _, body = wait_until(lambda: (r := get(agent, "/healthz"))[0] == 503 and r, 20, "503 from /healthz", interval=0.05)
    doc = json.loads(body)
    assert doc["status"] == "unhealthy" and "has not answered" in doc["error"]
    text = get(agent, "/metrics")[1]
    assert re.search(r"^revenant_agent_metadata_poll_errors_total [1-9]", text, re.M)


def test_registry_gauges_cover_periodic_checkpoints_and_errors(run_dir, standins, agents):
    rec = standins.add("job").record
    rec.last_checkpoint = LastCheckpoint(seq=7, time=time.time() - 100, bytes_uploaded=1 << 20, duration_s=1.5)
    rec.last_error = "store unreachable"
    write_task(run_dir, rec)
    agent = agents(run_dir, None)
    text = get(agent, "/metrics")[1]
    labels = '{namespace="default",id="job",key="default/pod-job/main"}'
    age = float(re.search(re.escape(f"revenant_task_last_checkpoint_age_seconds{labels}") + r" (\S+)", text)[1])
    assert age >= 100
    assert f"revenant_task_last_checkpoint_bytes_uploaded{labels} 1048576" in text
    assert f"revenant_task_last_checkpoint_duration_seconds{labels} 1.5" in text
    assert f"revenant_task_last_checkpoint_error{labels} 1" in text
    assert 'revenant_agent_provider_info{provider="none"} 1' in text
    assert get(agent, "/healthz")[0] == 200
    assert get(agent, "/nope")[0] == 404


def test_stop_during_a_drain_lets_the_drain_finish_first(metadata_server, standins, run_dir):
    """What SIGTERM does: no new polls, but the running drain still reports (and acknowledges)."""
    srv = metadata_server(("azure",))
    standins.add("job")
    stuck = standins.add("stuck", behavior="hang")
    agent = Agent(run_dir, AzureWatcher(srv.url), poll_interval=0.1, listen=None)
    agent.start()
    try:
        notice_deadline = time.time() + 6
        srv.azure_add_event("Preempt", in_s=6)
        wait_until(lambda: stuck.calls, 20, "the drain to reach the hung shim", interval=0.05)
        assert agent.reports == []
    finally:
        agent.stop()
    assert time.time() < notice_deadline
    assert {r.id: r.status for r in agent.reports[0].results} == {"job": "ok", "stuck": "timed_out"}
    assert len(srv.state.azure_acks) == 1
