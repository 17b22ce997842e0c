"""`make demo`: a container survives its node.

Two private containerd "nodes" on this machine and an embedded file:// store. A memjob keeping 256 MiB
of state only in memory runs on node A under revenant's runtime with a checkpoint key and periodic
checkpoints. A local metadata server announces an AWS spot interruption (IMDSv2); a real `revenant
agent` takes the final checkpoint; node A is destroyed (containerd killed, root and state wiped); the
same container is created on node B with a plain `ctr run` and the same key, and it goes on.

Run as: PYTHONPATH=tests python -m harness.demo [--mib 256] [--interval 6s]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from .containerd import ContainerdNode
from .images import build_test_images
from .memjob import assert_continuous, expected_checksum, read_steps, wait_for_step
from .metadata_server import MetadataServer
from .protect import (
    AgentProcess,
    Job,
    annotation_flags,
    checkpointed_steps,
    destroy_node,
    job_log,
    marker_of,
    registry_record,
    run_job,
    store_checkpoints,
    wait_for_seq,
    wait_stopped,
)
from .wait import wait_until

T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


class Timeline(threading.Thread):
    """Prints node A's checkpoints and the job's progress as they happen."""

    def __init__(self, node: ContainerdNode, cid: str) -> None:
        super().__init__(daemon=True)
        self.node, self.cid = node, cid
        self.halt = threading.Event()
        self.uploads: dict[int, int] = {}  # seq -> bytes uploaded, every checkpoint (the store prunes)

    def run(self) -> None:
        seen, last_step_print = 0, time.monotonic()
        while not self.halt.wait(0.2):
            rec = registry_record(self.node, self.cid) or {}
            last = rec.get("last_checkpoint") or {}
            if last.get("seq", 0) > seen:
                seen = last["seq"]
                self.uploads[seen] = int(last.get("bytes_uploaded", 0))
                steps = read_steps(job_log(self.node, self.cid))
                say(
                    f"node A: checkpoint #{seen} committed (periodic): {mib(last.get('bytes_uploaded', 0))} "
                    f"uploaded in {last.get('duration_s', 0):.1f}s; job at step {steps[-1].n if steps else '?'}"
                )
            if time.monotonic() - last_step_print > 5:
                steps = read_steps(job_log(self.node, self.cid))
                if steps:
                    say(f"node A: job at step {steps[-1].n} (checksum {steps[-1].checksum})")
                last_step_print = time.monotonic()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="job memory (default 256)")
    ap.add_argument("--interval", default="6s", help="periodic checkpoint interval (default 6s)")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="rv-demo-"))
    store = f"file://{work / 'store'}"
    say("building test images (busybox + memjob, locally)")
    images = build_test_images(work / "images")
    node_a, node_b = ContainerdNode("a"), ContainerdNode("b")
    metadata = MetadataServer(("aws",))
    agent: AgentProcess | None = None
    timeline: Timeline | None = None
    job = Job(
        "job", "demo/trainer/main", store, mib=args.mib, seed=7, interval=args.interval, marker="written-on-node-A"
    )
    try:
        node_a.start()
        node_b.start()
        metadata.start()
        say(f"node A: containerd {node_a.address}")
        say(f"node B: containerd {node_b.address}")
        say(f"store: {store}; metadata server (AWS IMDSv2): {metadata.url}")
        image_a, image_b = node_a.import_image(images.memjob), node_b.import_image(images.memjob)
        agent = AgentProcess(node_a.revenant_run_dir, metadata.url, work / "agent.log")
        agent.start()
        say(f"node A: `revenant agent --provider aws --metadata-url aws={metadata.url}` watching for notices")
        flags = " ".join(annotation_flags(job.annotations()))
        say(f"node A: ctr run -d --runtime io.containerd.revenant.v1 {flags} {image_a} job <memjob {args.mib} MiB>")
        run_job(node_a, image_a, job)
        timeline = Timeline(node_a, job.cid)
        timeline.start()
        wait_for_seq(node_a, job.cid, 2, timeout=300)

        say("metadata server: spot instance-action `terminate` in 120s (AWS gives two minutes)")
        t_notice = time.monotonic()
        metadata.aws_terminate(120)
        wait_until(lambda: any(e.get("event") == "notice" for e in agent.events()), 30, "the agent to see it")
        timeline.halt.set()  # from here on the agent's report tells what happens on node A
        say("agent: notice seen; final checkpoint of every protected task on node A")
        summary = agent.wait_drain(timeout=300)
        notice_to_committed = time.monotonic() - t_notice
        results = agent.results()
        timeline.halt.set()
        if not summary.get("ok") or not results or results[0]["status"] != "ok":
            say(f"agent: final checkpoint FAILED: {results}")
            return 1
        final = results[0]
        say(
            f"agent: checkpoint #{final['seq']} committed {notice_to_committed:.1f}s after the notice "
            f"(frozen {final['freeze_s']:.2f}s, {mib(final['bytes_uploaded'])} uploaded); job stopped"
        )
        wait_stopped(node_a, job.cid)
        steps_a = read_steps(job_log(node_a, job.cid))
        say(f"node A: job stopped at step {steps_a[-1].n}; destroying node A (containerd killed, root and state wiped)")
        destroy_node(node_a)
        agent.stop()

        say(f"node B: ctr run -d --runtime io.containerd.revenant.v1 {flags} {image_b} job <same command>")
        t_run = time.monotonic()
        run_job(node_b, image_b, job)
        log_b = job_log(node_b, job.cid)
        steps_b = wait_for_step(log_b, steps_a[-1].n + 1, timeout=300)
        resume_s = time.monotonic() - t_run
        rec = registry_record(node_b, job.cid) or {}
        say(
            f"node B: restored from checkpoint #{rec.get('restored_from')}; job at step {steps_b[-1].n} "
            f"{resume_s:.1f}s after `ctr run`"
        )
        steps_b = wait_for_step(log_b, steps_b[-1].n + 5, timeout=120)
        assert_continuous(steps_b)
        last = steps_b[-1]
        memory_ok = last.checksum == expected_checksum(images.memjob_binary, job.mib, job.seed, last.n)
        file_ok = marker_of(node_b, job.cid) == job.marker
        say(
            f"node B: step {last.n} checksum {last.checksum} "
            f"{'matches' if memory_ok else 'DIFFERS from'} the host's replay; /data/marker "
            f"{'came back' if file_ok else 'is MISSING'}"
        )
        at_checkpoint = checkpointed_steps(store, job.key, final["seq"], work)[-1].n
        checkpoints = store_checkpoints(store, job.key)

        print("\nsummary")
        print(f"  steps done on node A            {steps_a[-1].n}")
        print(f"  steps in the final checkpoint   {at_checkpoint}")
        print(f"  steps lost                      {steps_a[-1].n - at_checkpoint}")
        print(
            f"  notice -> checkpoint committed  {notice_to_committed:.1f}s (agent polls every {agent.poll_interval}s)"
        )
        print(f"  ctr run on B -> job stepping    {resume_s:.1f}s")
        print(f"  memory verified (checksum)      {'yes' if memory_ok else 'NO'}")
        print(f"  writable layer verified         {'yes' if file_ok else 'NO'}")
        uploads = {**timeline.uploads, final["seq"]: final["bytes_uploaded"]}
        kept = {c.seq: c for c in checkpoints}
        print(
            f"  bytes uploaded in total         {mib(sum(uploads.values()))} over {len(uploads)} checkpoints "
            "(after dedup and compression)"
        )
        for seq, up in sorted(uploads.items()):
            c = kept.get(seq)
            md = (c.metadata or {}) if c else {}
            what = "final (spot notice)" if seq == final["seq"] else "periodic"
            extra = f"{mib(c.bytes_read):>10} read  frozen {md.get('freeze_s', 0):.2f}s" if c else "(pruned)"
            print(f"    #{seq:<3} {what:<20} {mib(up):>10} uploaded  {extra}")
        return 0 if memory_ok and file_ok and steps_a[-1].n == at_checkpoint else 1
    finally:
        if timeline is not None:
            timeline.halt.set()
        if agent is not None:
            agent.stop()
        metadata.stop()
        node_a.destroy()
        node_b.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
