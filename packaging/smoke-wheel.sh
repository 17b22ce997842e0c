#!/usr/bin/env bash
# Smoke test of the product as users install it: build the wheel, install it into a fresh virtualenv
# WITHOUT dev extras (no grpcio-tools, no pytest, no source tree on the path), import every module it holds,
# and run each command once:
#   revenant --version; a `revenant store` put/get/verify round trip on a file:// store (content compared);
#   an az:// store opened without credentials failing with the backend's own message;
#   revenant-snapshotter on a unix socket answering a real gRPC Stat (NotFound) and stopping on SIGTERM;
#   containerd-shim-revenant-v1 -v and --version.
# Usage: packaging/smoke-wheel.sh [PYTHON]  (PYTHON builds the wheel and needs `build`; default .venv/bin/python).
# Needs network access to the package index for the runtime dependencies. About half a minute.
set -euo pipefail
cd "$(dirname "$0")/.."

build_python=${1:-.venv/bin/python}
work=$(mktemp -d /tmp/revenant-smoke.XXXXXX)
snap_pid=""
cleanup() {
  if [ -n "$snap_pid" ] && kill -0 "$snap_pid" 2>/dev/null; then kill "$snap_pid"; wait "$snap_pid" || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
step() { printf 'smoke-wheel: [%s] %s\n' "$SECONDS" "$*" >&2; }
fail() { printf 'smoke-wheel: FAILED: %s\n' "$*" >&2; exit 1; }

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' shim/version.py)
[ -n "$version" ] || fail "no __version__ in shim/version.py"

# The sdist needs only hatchling (the dev virtualenv has it); the wheel is built from the unpacked sdist in
# an isolated environment with [build-system] requires, as pip would, so the sdist's contents and the
# grpcio-tools pin are what is tested.
step "building the sdist, then the wheel from it"
{
  "$build_python" -m build --sdist --no-isolation --outdir "$work/dist" . &&
    tar -xzf "$work/dist/revenant-$version.tar.gz" -C "$work" &&
    "$build_python" -m build --wheel --outdir "$work/dist" "$work/revenant-$version"
} >"$work/build.log" 2>&1 || { cat "$work/build.log" >&2; fail "build"; }
wheel=$(ls "$work"/dist/revenant-"$version"-*.whl)

step "installing $(basename "$wheel") into a fresh virtualenv, no extras"
python3 -m venv "$work/venv"
# --no-compile: byte-compiling botocore's thousands of modules would be most of this test's time.
"$work/venv/bin/pip" install -q --no-compile "$wheel" >"$work/pip.log" 2>&1 || { cat "$work/pip.log" >&2; fail "pip install"; }
bin=$work/venv/bin
cd "$work"  # nothing of the checkout on sys.path from here on

step "every module of the wheel imports with only the declared dependencies"
"$bin/python" - <<'PY' || fail "a module needs an undeclared dependency or is missing from the wheel"
import importlib
import pkgutil

failed = []
for top in ("shim", "snapshotter", "revenant_pb"):
    package = importlib.import_module(top)
    assert "site-packages" in package.__file__, package.__file__
    for module in pkgutil.walk_packages(package.__path__, top + "."):
        try:
            importlib.import_module(module.name)
        except Exception as e:  # report them all, not the first
            failed.append(f"{module.name}: {e!r}")
raise SystemExit("\n".join(failed) or None)
PY

step "revenant --version"
out=$("$bin/revenant" --version)
[ "$out" = "revenant $version" ] || fail "revenant --version printed '$out'"
"$bin/revenant" --help | grep -q '^    store ' || fail "revenant --help does not list the store command"

step "revenant store put/get/verify on a file:// store"
mkdir -p src/sub
head -c 300000 /dev/urandom >src/blob
printf 'hello\n' >src/sub/note.txt
store="file://$work/store"
"$bin/revenant" store put --store "$store" --key smoke/one src >/dev/null
"$bin/revenant" store get --store "$store" --key smoke/one restored >/dev/null
diff -r src restored || fail "restored content differs"
"$bin/revenant" store verify --store "$store" >/dev/null || fail "verify"

step "an az:// store opens with the declared Azure SDK and asks for credentials"
if out=$(env -u AZURE_STORAGE_CONNECTION_STRING "$bin/revenant" store verify \
    --store "az://smokeacct/smoke?endpoint=http://127.0.0.1:9/smokeacct" 2>&1); then
  fail "an az:// store without credentials verified"
fi
printf '%s' "$out" | grep -q "no Azure credentials" || fail "az:// without credentials said: $out"

step "revenant-snapshotter answers gRPC on a unix socket"
"$bin/revenant-snapshotter" --version | grep -qx "revenant-snapshotter $version" || fail "snapshotter --version"
"$bin/revenant-snapshotter" --address "$work/snap.sock" --root "$work/snaproot" --log-level WARNING \
  2>"$work/snapshotter.log" &
snap_pid=$!
"$bin/python" - "$work/snap.sock" <<'PY' || { cat "$work/snapshotter.log" >&2; fail "snapshotter gRPC"; }
import sys

import grpc

from revenant_pb.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from revenant_pb.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc

channel = grpc.insecure_channel(f"unix:{sys.argv[1]}")
grpc.channel_ready_future(channel).result(timeout=20)
stub = pb_grpc.SnapshotsStub(channel)
try:
    stub.Stat(pb.StatSnapshotRequest(snapshotter="revenant", key="no-such-key"), timeout=10)
except grpc.RpcError as e:
    if e.code() != grpc.StatusCode.NOT_FOUND:
        raise SystemExit(f"Stat of a missing key: {e.code()} {e.details()}")
else:
    raise SystemExit("Stat of a missing key succeeded")
PY
kill -TERM "$snap_pid"
wait "$snap_pid" || fail "the snapshotter exited $? on SIGTERM"
snap_pid=""
[ ! -e "$work/snap.sock" ] || fail "the snapshotter left its socket behind"

step "containerd-shim-revenant-v1 -v / --version"
for flag in -v --version; do
  out=$("$bin/containerd-shim-revenant-v1" "$flag")
  [ "$out" = "containerd-shim-revenant-v1 (revenant) $version" ] || fail "shim $flag printed '$out'"
done

step "passed (revenant $version)"
