#!/usr/bin/env bash
# Download Debian 13 (trixie) CRIU 4.1.1 and every library it needs, unpacked into one folder, so that
# tests/gpu/run_on_gpu.sh can start criu on a machine that has no CRIU and no package registry (the GPU
# machine: Ubuntu 24.04, glibc 2.39). Run it HERE (Debian 12 with trixie pinned, or Debian 13).
#
# criu from trixie is linked against glibc 2.41, newer than the GPU machine's, so the folder carries its
# own libc6 and is started through that libc's loader (never the system's):
#   $DIR/root/usr/lib64/ld-linux-x86-64.so.2 --library-path $DIR/libpath $DIR/root/usr/sbin/criu ...
# The wrapper $DIR/criu does exactly that. Output folder (gitignored): tests/gpu/.criu (or $1).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
dir=${1:-$here/.criu}
# The dependency closure of criu (apt-cache depends --recurse, Depends/Pre-Depends only), written out so
# the folder's content is reviewable; the check at the end fails if one is missing.
packages=(criu libcompel1 libc6 libgcc-s1 gcc-14-base libbsd0 libmd0 libgnutls30t64 libhogweed6t64
          libnettle8t64 libgmp10 libidn2-0 libunistring5 libp11-kit0 libffi8 libtasn1-6 libnet1
          libnftables1 libnftnl11 libmnl0 libjansson4 libxtables12 libnl-3-200 libprotobuf-c1 libuuid1)

rm -rf "$dir"
mkdir -p "$dir/debs" "$dir/root"
# -t trixie: on Debian 12 the trixie suite is pinned low (environment.md), so name it; on 13 it is the default.
(cd "$dir/debs" && apt-get download -q -t trixie "${packages[@]}" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
for deb in "$dir"/debs/*.deb; do dpkg-deb -x "$deb" "$dir/root"; done

# Every shared-library folder of the unpacked tree, in one list for --library-path.
libpath=$(find "$dir/root" \( -name '*.so' -o -name '*.so.[0-9]*' \) -printf '%h\n' | sort -u | sed "s|^$dir/||" | tr '\n' ':')
echo "${libpath%:}" > "$dir/libpath"
loader=$(find "$dir/root" -name 'ld-linux-x86-64.so.2' | head -n1)
[[ -n $loader ]] || { echo "fetch-criu: no ld-linux-x86-64.so.2 unpacked (libc6 missing?)" >&2; exit 1; }
echo "${loader#"$dir"/}" > "$dir/loader"

cat > "$dir/criu" <<'WRAP'
#!/usr/bin/env bash
# Start the carried criu through the carried glibc loader, with only carried libraries on its path.
d=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
lp=$(sed "s|\([^:]*\)|$d/\1|g" "$d/libpath")
exec "$d/$(cat "$d/loader")" --inhibit-cache --library-path "$lp" "$d/root/usr/sbin/criu" "$@"
WRAP
chmod +x "$dir/criu"
rm -rf "$dir/debs"   # the unpacked tree is all the device run needs; keep the carried size down

# Check: every library criu needs resolves inside the folder. In a private mount namespace, hide the
# system's library folder (one mount, then exec: nothing else may start once it is hidden) and start the
# carried loader directly, so nothing can silently come from this machine.
lp=$(sed "s|\([^:]*\)|$dir/\1|g" "$dir/libpath")
check='mount -t tmpfs none /usr/lib/x86_64-linux-gnu &&
       exec "$0" --inhibit-cache --library-path "$1" "$2" --version'
if unshare -m sh -c "$check" "$dir/$(cat "$dir/loader")" "$lp" "$dir/root/usr/sbin/criu"; then
  echo "fetch-criu: OK, criu runs from $dir alone ($(du -sh "$dir" | cut -f1))"
else
  echo "fetch-criu: the carried criu does not start without this machine's libraries" >&2
  exit 1
fi
