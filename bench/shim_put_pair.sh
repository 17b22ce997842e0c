#!/bin/bash
# The shim's put beside a bare put of the same bytes, in one window (bench/RESULTS.md, "The in-shim gap after
# the store-client log fix"): the notice path of a GIB GiB job (bench/sweep_bench.py, staged dump, fresh
# SeaweedFS) watched by bench/shim_put_watch.py, which hard-links the staged dump to KEEP; then
# bench/s3_put_profile.py puts that dump outside the shim. If KEEP already holds a dump (the previous run's), it is
# put bare first, so consecutive runs bracket each shim put with a bare one before and after. Each put reports
# bench/cpu_census.py's figures. The last run of a series: --last removes KEEP at the end.
#
#   REVENANT_TEST_NAMESPACE=rt-x flock /tmp/revenant-heavy.lock bench/shim_put_pair.sh OUT [GIB] [none|idle|gil] [--last]
set -eu
cd "$(dirname "$0")/.."
OUT=$1 GIB=${2:-2} SPY=${3:-none} LAST=${4:-}
KEEP=${KEEP:-/dev/shm/revenant-pair-keep}  # the same tmpfs as the shim's staging: hard links, no copy
CID=s3j$((GIB * 1024))
: "${REVENANT_TEST_NAMESPACE:?the namespace of the sweep jobs}"
mkdir -p "$OUT"
stamp() { echo "$(date -u +%T) $1, load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/times"; }
bare() {  # $1: log name
    .venv/bin/python bench/s3_put_profile.py --dir "$KEEP" --page-images > "$OUT/$1.log" 2>&1 &
    local b=$!
    if [ "$SPY" != none ]; then
        .venv/bin/py-spy record -p $b --nonblocking "--$SPY" --threads --rate 50 --format raw \
            -o "$OUT/$1-$SPY.raw" > /dev/null 2>&1 &
    fi
    wait $b
}
stamp start
if [ -d "$KEEP" ]; then
    bare bare-before
    rm -rf "$KEEP"
    stamp "bare put of the previous dump done"
fi
.venv/bin/python bench/shim_put_watch.py --cid "$CID" --keep "$KEEP" --out "$OUT" --spy "$SPY" > "$OUT/watch.log" 2>&1 &
watch=$!
.venv/bin/python bench/sweep_bench.py --sizes "$GIB" --skip local --skip podman --skip incremental --skip run \
    --notice-s 900 --out-dir "$OUT/sweep" > "$OUT/sweep.log" 2>&1
wait $watch
stamp "shim put done"
bare bare-after
stamp "bare put done"
if [ "$LAST" = --last ]; then rm -rf "$KEEP"; fi
grep -h "^| $GIB | [0-9]" "$OUT/sweep.log" | tail -1
grep -h "wall .* CPU-s busy" "$OUT"/watch.log "$OUT"/bare-*.log
