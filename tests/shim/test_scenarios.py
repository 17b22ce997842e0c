"""Issue 3's scenario list, run against the stock runc shim and revenant's shim alike."""

from __future__ import annotations


def test_run_rm_output_and_exit_codes(runtime):
    res = runtime.run("hello", "echo", "hello from busybox", flags=("--rm",))
    assert res.stdout.strip() == "hello from busybox"
    assert runtime.run("ok", "true", flags=("--rm",)).returncode == 0
    res = runtime.run("fails", "sh", "-c", "echo oops >&2; exit 1", flags=("--rm",), check=False)
    assert res.returncode == 1, res
    assert "oops" in res.stderr
