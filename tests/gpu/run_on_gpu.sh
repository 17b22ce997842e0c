#!/usr/bin/env bash
# GPU check (CUDA state through the driver's checkpoint API + CRIU). Runs on a GPU machine like
# the one ../shared/docs/environment.md describes (H100/H200, Ubuntu 24.04, driver 580, torch in python3,
# no package registries, no CRIU); never in CI. Needs, carried with the working tree:
#   tests/gpu/.criu   made HERE by tests/gpu/fetch-criu.sh (Debian 13 criu + its libraries + glibc loader)
# Device call:  command "bash tests/gpu/run_on_gpu.sh", carry ["tests/gpu/.criu"], timeout_s 600.
#
# What it does (tests/gpu/gpu_check.py): a torch job with >= 4 GiB of GPU state runs N steps uninterrupted;
# the same job is checkpointed at step K (shim.gpu lock + checkpoint, `criu dump --leave-running`, restore +
# unlock), runs on a little, is SIGKILLed, `criu restore`d, resumed through shim.gpu, and runs to N; its
# loss trajectory and final checksum must equal the uninterrupted run's exactly.
# The container path (containerd + runc + the revenant shim) is not used: the GPU machine has neither
# containerd nor runc nor a registry to fetch them from, and the shim's task service is not written yet;
# the same GPU module drives a plain CRIU dump/restore of the job's process tree instead.
#
# Benchmark figures for bench/RESULTS.md come from the same run (gpu_check.json: lock/checkpoint/dump/
# restore/unlock seconds, stall, restart_to_first_step_s); for 16 GiB of state run it again with
#   GIB=16 STEPS=200 CHECKPOINT_AT=60 bash tests/gpu/run_on_gpu.sh
# Budget: ~15 s of probes, ~20 s reference, ~60 s checkpointed run with dump/restore of ~5 GB; well inside
# the 10-minute limit (hard stop at 540 s). Every process started is killed on the way out.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
criu_dir=$repo/tests/gpu/.criu
work=${WORK:-/tmp/revenant-gpu-check}
out=${OUT:-$work/out}
py=${PYTHON:-python3}
steps=${STEPS:-400}
ckpt_at=${CHECKPOINT_AT:-150}
gib=${GIB:-4}
# GPU_CHECK_ARGS: extra gpu_check.py arguments; "--job standin_job.py --dry-run" (with the fake libcuda's
# environment, see tests/gpu/test_gpu_check_rehearsal.py) rehearses this script on a machine without a GPU.

if [[ ! -x $criu_dir/criu ]]; then
  echo "run_on_gpu: $criu_dir/criu missing: run tests/gpu/fetch-criu.sh here and carry tests/gpu/.criu" >&2
  exit 2
fi
rm -rf "$work"
mkdir -p "$work" "$out"

controller=
cleanup() {
  # gpu_check.py kills its jobs itself; this covers a controller killed by the timeout.
  if [[ -n $controller ]] && kill -0 "$controller" 2>/dev/null; then
    kill -TERM "$controller" 2>/dev/null; sleep 2; kill -KILL "$controller" 2>/dev/null
  fi
  kill_recorded
  rm -rf "$work/img"   # ~5 GB of CRIU images
}
kill_recorded() {
  # The pids gpu_check.py recorded as it started them (normally it has killed them already).
  local pid
  [[ -f $work/pids ]] || return 0
  while read -r pid; do
    # Only if the pid still runs one of our programs (not a recycled pid).
    tr '\0' ' ' 2>/dev/null < "/proc/$pid/cmdline" \
      | grep -q -e torch_job.py -e standin_job.py -e torch.cuda._sleep -e '^sleep 60' \
      && kill -KILL "$pid" 2>/dev/null
  done < "$work/pids"
}
trap cleanup EXIT

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
uname -r
"$py" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
echo "== criu (carried)"
"$criu_dir/criu" --version
"$criu_dir/criu" check 2>&1 | tail -n 3 || true

echo "== check"
export PYTHONPATH=$repo:$repo/tests${PYTHONPATH:+:$PYTHONPATH}  # shim, and harness/wait.py
export PYTHONUNBUFFERED=1
timeout -k 10 540 "$py" "$repo/tests/gpu/gpu_check.py" --work "$work" --out "$out" --criu "$criu_dir/criu" \
  --python "$py" --steps "$steps" --checkpoint-at "$ckpt_at" --gib "$gib" ${GPU_CHECK_ARGS:-} &
controller=$!
wait "$controller"
rc=$?
controller=
cp "$work"/*.log "$out"/ 2>/dev/null || true
echo "== result: rc=$rc (gpu_check.json, job logs and CRIU logs in $out)"
exit "$rc"
