#!/usr/bin/env bash
# System dependencies for revenant on Debian 12 (bookworm) or 13 (trixie), as root.
# Idempotent: a second run checks what is there and changes nothing.
set -euo pipefail

log() { printf 'install-deps: %s\n' "$*" >&2; }
die() { printf 'install-deps: ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (apt-get and criu need it)"
[ -r /etc/debian_version ] || die "only Debian 12 and 13 are supported (no /etc/debian_version)"
debian_major=$(cut -d. -f1 /etc/debian_version)
case "$debian_major" in
  12|13) ;;
  trixie*|forky*|sid*) debian_major=13 ;;
  *) die "unsupported Debian release $(cat /etc/debian_version); need 12 or 13" ;;
esac

# Packages from the release's own suite.
packages=(containerd runc iptables busybox-static docker-registry zstd
          containernetworking-plugins iproute2 gcc libc6-dev make python3-venv)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

# Debian 12: the trixie suite at a low pin priority, so nothing is pulled from it unasked.
add_trixie() {
  if [ ! -f /etc/apt/sources.list.d/revenant-trixie.sources ]; then
    log "adding the Debian 13 (trixie) suite at pin priority 100 (criu, containerd 1.7 for tests)"
    cat > /etc/apt/sources.list.d/revenant-trixie.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    cat > /etc/apt/preferences.d/revenant-trixie <<'PIN'
Package: *
Pin: release n=trixie
Pin-Priority: 100
PIN
    apt_updated=0
  fi
}

criu_ok() {
  command -v criu >/dev/null 2>&1 || return 1
  local v; v=$(criu --version 2>/dev/null | sed -n 's/^Version: *//p')
  [ "${v%%.*}" -ge 4 ] 2>/dev/null
}

apt_updated=0
apt_update() { [ $apt_updated = 1 ] || { log "apt-get update"; apt-get update -qq; apt_updated=1; }; }
export DEBIAN_FRONTEND=noninteractive

if [ ${#missing[@]} -gt 0 ]; then
  apt_update
  log "installing ${missing[*]}"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! criu_ok; then
  if [ "$debian_major" = 12 ]; then
    # Debian 12's criu 3.17 fails on recent kernels (vdso bounds); 4.1.1 from trixie works.
    # Add trixie at a low pin priority so nothing else is pulled from it unasked.
    add_trixie
    apt_update
    log "installing criu from trixie"
    apt-get install -y -qq --no-install-recommends -t trixie criu >/dev/null
  else
    apt_update
    apt-get install -y -qq --no-install-recommends criu >/dev/null
  fi
fi

criu_ok || die "criu >= 4.0 is not installed (criu --version: $(criu --version 2>&1 | head -1))"
if ! out=$(criu check 2>&1); then
  die "CRIU cannot checkpoint on this kernel ('criu check' said: ${out}). Need a kernel with CONFIG_CHECKPOINT_RESTORE and criu >= 4.0."
fi
command -v iptables-restore >/dev/null || die "iptables-restore is missing: runc checkpoint needs it"
# containerd 1.7 beside the system's 1.6, for the Kubernetes tests that run both: Debian 13's package
# unpacked into a private directory (never installed: the system containerd stays as it is).
CONTAINERD17_DIR=/opt/revenant-test/containerd-1.7
if ! "$CONTAINERD17_DIR/usr/bin/containerd" --version 2>/dev/null | grep -q ' 1\.7\.'; then
  if [ "$debian_major" = 12 ]; then
    add_trixie
    suite=(-t trixie)
  else
    suite=()
  fi
  apt_update
  tmp=$(mktemp -d)
  log "unpacking containerd 1.7 from Debian 13 into $CONTAINERD17_DIR"
  (cd "$tmp" && apt-get download -qq "${suite[@]}" containerd >/dev/null 2>&1) || die "apt-get download containerd (1.7) failed"
  rm -rf "$CONTAINERD17_DIR.new" && mkdir -p "$CONTAINERD17_DIR.new"
  dpkg -x "$tmp"/containerd_*.deb "$CONTAINERD17_DIR.new"
  rm -rf "$tmp" "$CONTAINERD17_DIR" && mv "$CONTAINERD17_DIR.new" "$CONTAINERD17_DIR"
  "$CONTAINERD17_DIR/usr/bin/containerd" --version | grep -q ' 1\.7\.' || die "the unpacked containerd is not 1.7"
fi

log "ok: $(containerd --version | awk '{print $1, $3}'), runc $(runc --version | awk 'NR==1{print $3}'), criu $(criu --version | sed -n 's/^Version: *//p')"
