#!/usr/bin/env bash
# Build the self-contained tree the DaemonSet copies onto each node (`make package`):
#   DEST/venv                 a virtualenv around PYTHON with the revenant wheel (no dev extras)
#   DEST/share/containerd     the CRI runtime handler fragments (v2 appended, v3 drop-in)
#   DEST/share/node_setup.py  the node installer (install, uninstall, unlabel)
# A virtualenv is not relocatable: DEST must be the path it runs from on the node (/opt/revenant), and
# PYTHON an interpreter that exists there too -- in the installer image, a relocatable CPython unpacked
# at /opt/revenant/python (see Dockerfile), so the node needs no Python of its own.
# Usage: packaging/kubernetes/build-tree.sh DEST PYTHON [BUILD_PYTHON]
#   BUILD_PYTHON builds the wheel and needs `build` (default .venv/bin/python).
# Needs the package index for the runtime dependencies.
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=${1:?usage: build-tree.sh DEST PYTHON [BUILD_PYTHON]}
python=${2:?usage: build-tree.sh DEST PYTHON [BUILD_PYTHON]}
build_python=${3:-.venv/bin/python}
"$python" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' ||
  { echo "build-tree: $python is not Python 3.11+" >&2; exit 1; }

work=$(mktemp -d /tmp/revenant-tree.XXXXXX)
trap 'rm -rf "$work"' EXIT
"$build_python" -m build --wheel --outdir "$work" . >"$work/build.log" 2>&1 || { cat "$work/build.log" >&2; exit 1; }
wheel=$(ls "$work"/revenant-*.whl)

rm -rf "$dest/venv" "$dest/share"
mkdir -p "$dest/share/containerd"
"$python" -m venv "$dest/venv"
"$dest/venv/bin/pip" install -q --no-compile "$wheel"
cp packaging/containerd/revenant-cri-v2.toml packaging/containerd/revenant-cri-v3.toml "$dest/share/containerd/"
install -m 0755 packaging/kubernetes/node_setup.py "$dest/share/node_setup.py"
"$dest/venv/bin/containerd-shim-revenant-v1" -v
echo "build-tree: $dest ready ($(basename "$wheel"))"
