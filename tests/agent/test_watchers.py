"""Notice watchers against the local metadata server, which serves each provider's documented paths,
headers and bodies (IMDSv2 tokens, GCP ETags and wait_for_change, Azure Scheduled Events)."""

from __future__ import annotations

import threading
import time

import pytest

from shim.agent import fetch
from shim.agent.aws import AwsWatcher
from shim.agent.azure import AzureWatcher
from shim.agent.gcp import GcpWatcher
from shim.agent.notice import MetadataError

# ---- AWS IMDSv2 ------------------------------------------------------------------------------------


def test_aws_server_refuses_requests_without_a_token(metadata_server) -> None:
    srv = metadata_server(("aws",))
    resp = fetch.request("GET", srv.url + "/latest/meta-data/spot/instance-action")
    assert resp.status == 401


def test_aws_no_notice_then_terminate(metadata_server) -> None:
    srv = metadata_server(("aws",))
    w = AwsWatcher(srv.url)
    assert w.poll() is None
    assert w.poll() is None
    deadline = srv.aws_terminate(120)
    notice = w.poll()
    assert notice is not None
    assert (notice.provider, notice.action, notice.exit, notice.advisory) == ("aws", "terminate", True, False)
    assert notice.deadline == deadline
    assert notice.raw["action"] == "terminate"
    assert w.poll().id == notice.id  # the same notice on every poll: the agent acts once
    # One token served all polls, and every GET carried it.
    puts = srv.requests_to("/latest/api/token")
    assert len(puts) == 1 and puts[0].method == "PUT"
    assert puts[0].headers["X-aws-ec2-metadata-token-ttl-seconds"] == "21600"
    gets = srv.requests_to("/latest/meta-data/")
    assert gets and all(g.headers.get("X-aws-ec2-metadata-token") for g in gets)


@pytest.mark.parametrize("action", ["stop", "hibernate"])
def test_aws_stop_and_hibernate_are_final_too(metadata_server, action: str) -> None:
    srv = metadata_server(("aws",))
    srv.aws_terminate(120, action=action)
    notice = AwsWatcher(srv.url).poll()
    assert notice is not None and notice.action == action and notice.exit


def test_aws_expired_token_gets_401_and_is_renewed(metadata_server) -> None:
    srv = metadata_server(("aws",))
    w = AwsWatcher(srv.url)
    assert w.poll() is None
    srv.aws_expire_tokens()  # e.g. IMDS restarted: the cached token is now refused
    srv.aws_terminate(60)
    notice = w.poll()
    assert notice is not None and notice.action == "terminate"
    statuses = [s.path for s in srv.seen]
    assert len(srv.requests_to("/latest/api/token")) == 2
    assert statuses.count("/latest/meta-data/spot/instance-action") == 3  # 1st poll, 401, retry


def test_aws_token_is_renewed_before_it_expires(metadata_server) -> None:
    srv = metadata_server(("aws",))
    w = AwsWatcher(srv.url, token_ttl_s=1)
    assert w.poll() is None
    time.sleep(1.1)  # past the token's lifetime
    assert w.poll() is None
    assert len(srv.requests_to("/latest/api/token")) == 2
    # Renewed ahead of expiry: no GET was refused and retried (2 polls x 2 paths).
    assert len(srv.requests_to("/latest/meta-data/")) == 4


def test_aws_rebalance_is_advisory_and_instance_action_wins(metadata_server) -> None:
    srv = metadata_server(("aws",))
    w = AwsWatcher(srv.url, advisory_window_s=90)
    srv.aws_rebalance_now()
    before = time.time()
    notice = w.poll()
    assert notice is not None
    assert (notice.action, notice.advisory, notice.exit) == ("rebalance", True, False)
    assert notice.deadline >= before + 90
    assert "noticeTime" in notice.raw
    srv.aws_terminate(120)
    assert w.poll().action == "terminate"


def test_aws_unreachable_raises_metadata_error() -> None:
    with pytest.raises(MetadataError):
        AwsWatcher("http://127.0.0.1:1", timeout=0.5).poll()


# ---- GCP -------------------------------------------------------------------------------------------


def test_gcp_server_requires_the_flavor_header(metadata_server) -> None:
    srv = metadata_server(("gcp",))
    assert fetch.request("GET", srv.url + "/computeMetadata/v1/instance/preempted").status == 403


def test_gcp_false_then_true_by_plain_polling(metadata_server) -> None:
    srv = metadata_server(("gcp",))
    w = GcpWatcher(srv.url, wait_for_change=False, notice_window_s=30)
    assert w.poll() is None
    srv.gcp_set_preempted(True)
    before = time.time()
    notice = w.poll()
    assert notice is not None
    assert (notice.provider, notice.action, notice.exit, notice.raw) == ("gcp", "preempt", True, "TRUE")
    assert before + 30 <= notice.deadline <= time.time() + 30
    reqs = srv.requests_to("/computeMetadata/v1/instance/preempted")
    assert all(r.headers["Metadata-Flavor"] == "Google" for r in reqs)
    assert not any("wait_for_change" in r.path for r in reqs)


def test_gcp_wait_for_change_long_poll_returns_when_preempted(metadata_server) -> None:
    srv = metadata_server(("gcp",))
    w = GcpWatcher(srv.url, wait_for_change=True, long_poll_timeout_s=60)
    assert w.poll() is None  # a plain GET first: current value and its ETag
    result: list = []
    poller = threading.Thread(target=lambda: result.append(w.poll()))
    poller.start()
    assert srv.wait_until(lambda st: st.gcp_waiting == 1), "the long-poll never reached the server"
    assert result == []  # held open while nothing changes
    srv.gcp_set_preempted(True)
    poller.join(10)
    assert not poller.is_alive()
    assert result[0] is not None and result[0].action == "preempt"
    long_polls = [r.path for r in srv.requests_to("/computeMetadata/v1/instance/preempted?")]
    assert len(long_polls) == 1
    assert "wait_for_change=true" in long_polls[0] and "last_etag=etag-1" in long_polls[0]


def test_gcp_long_poll_timeout_returns_no_notice(metadata_server) -> None:
    srv = metadata_server(("gcp",))
    w = GcpWatcher(srv.url, wait_for_change=True, long_poll_timeout_s=1)
    assert w.poll() is None
    assert w.poll() is None  # the server answered FALSE after timeout_sec


def test_gcp_preempted_before_the_agent_started_is_seen_at_once(metadata_server) -> None:
    srv = metadata_server(("gcp",))
    srv.gcp_set_preempted(True)
    notice = GcpWatcher(srv.url, wait_for_change=True, long_poll_timeout_s=60).poll()
    assert notice is not None and notice.action == "preempt"


# ---- Azure -----------------------------------------------------------------------------------------


def test_azure_ignores_other_events_and_neighbours_then_acknowledges_preempt(metadata_server) -> None:
    srv = metadata_server(("azure",))
    w = AzureWatcher(srv.url)
    assert w.poll() is None
    srv.azure_add_event("Freeze", in_s=60)  # not a spot eviction
    srv.azure_add_event("Reboot", in_s=60)
    srv.azure_add_event("Preempt", in_s=60, resources=["some-other-vm"])  # a neighbour in the scale set
    assert w.poll() is None
    event = srv.azure_add_event("Preempt", in_s=45)
    notice = w.poll()
    assert notice is not None
    assert (notice.provider, notice.action, notice.exit) == ("azure", "preempt", True)
    assert notice.details["EventId"] == event["EventId"]
    assert notice.raw["EventId"] == event["EventId"]
    # NotBefore has whole seconds (RFC 1123).
    assert time.time() + 40 <= notice.deadline <= time.time() + 46
    gets = srv.requests_to("/metadata/scheduledevents")
    assert all(g.headers["Metadata"] == "true" and "api-version=2020-07-01" in g.path for g in gets)
    assert srv.state.azure_acks == []  # nothing is acknowledged by polling
    w.acknowledge(notice)
    assert srv.state.azure_acks == [{"StartRequests": [{"EventId": event["EventId"]}]}]
    post = next(s for s in srv.requests_to("/metadata/scheduledevents") if s.method == "POST")
    assert post.headers["Metadata"] == "true"


def test_azure_started_event_without_not_before_is_still_a_notice(metadata_server) -> None:
    srv = metadata_server(("azure",))
    event = srv.azure_add_event("Preempt", in_s=30)
    event["EventStatus"], event["NotBefore"] = "Started", ""
    notice = AzureWatcher(srv.url).poll()
    assert notice is not None and notice.deadline > time.time()


def test_azure_acknowledging_an_unknown_event_fails(metadata_server) -> None:
    srv = metadata_server(("azure",))
    from shim.agent.notice import Notice

    with pytest.raises(MetadataError):
        AzureWatcher(srv.url).acknowledge(Notice("azure", "preempt", 0, {}, details={"EventId": "NOPE"}))
