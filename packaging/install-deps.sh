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

# The trixie suite by name, whatever /etc/debian_version says (a Debian 12 userland may carry a 13.x
# base-files): CRIU 4 and the private containerd 1.7 and Docker trees come from trixie. A machine whose
# sources already name trixie (Debian 13 itself) gets no second, low-pinned copy.
ensure_trixie() {
  grep -rqs -e 'trixie' /etc/apt/sources.list /etc/apt/sources.list.d/ || add_trixie
  apt_update
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
  # Debian 12's criu 3.17 fails on recent kernels (vdso bounds); 4.1.1 from trixie works.
  ensure_trixie
  log "installing criu from trixie"
  apt-get install -y -qq --no-install-recommends -t trixie criu >/dev/null
fi

# Docker Engine for the Docker tests and `revenant rehearse`: Debian 13's docker.io, docker-cli and
# docker-compose (dockerd >= 23 runs shim v2 runtimes by name; from the trixie suite, at a low pin on Debian
# 12, hence pkg/trixie), unpacked into a directory of their own: installing them would pull Debian 13's
# containerd and runc over the system's.
DOCKER_DIR=${REVENANT_DOCKER_DIR:-/opt/revenant-test/docker}
DOCKER_VERSION_PREFIX=26.
docker_ok() {
  [ -x "$DOCKER_DIR/usr/sbin/dockerd" ] && [ -x "$DOCKER_DIR/usr/bin/docker" ] || return 1
  [ -x "$DOCKER_DIR/usr/bin/docker-compose" ] || return 1
  "$DOCKER_DIR/usr/sbin/dockerd" --version 2>/dev/null | grep -q "version ${DOCKER_VERSION_PREFIX}"
}
if ! docker_ok; then
  ensure_trixie
  apt_update
  log "unpacking Debian 13's docker.io, docker-cli and docker-compose into $DOCKER_DIR"
  dl=$(mktemp -d)
  chmod 755 "$dl"   # apt downloads as _apt
  (cd "$dl" && apt-get download -qq docker.io/trixie docker-cli/trixie docker-compose/trixie >/dev/null 2>&1) ||
    die "apt-get download docker.io docker-cli docker-compose failed"
  rm -rf "$DOCKER_DIR.new"
  mkdir -p "$DOCKER_DIR.new"
  for deb in "$dl"/*.deb; do dpkg-deb -x "$deb" "$DOCKER_DIR.new"; done
  rm -rf "$dl" "$DOCKER_DIR"
  mv "$DOCKER_DIR.new" "$DOCKER_DIR"
fi
docker_ok || die "dockerd ${DOCKER_VERSION_PREFIX}x is not in $DOCKER_DIR (dockerd --version: $("$DOCKER_DIR/usr/sbin/dockerd" --version 2>&1))"

criu_ok || die "criu >= 4.0 is not installed (criu --version: $(criu --version 2>&1 | head -1))"
if ! out=$(criu check 2>&1); then
  die "CRIU cannot checkpoint on this kernel ('criu check' said: ${out}). Need a kernel with CONFIG_CHECKPOINT_RESTORE and criu >= 4.0."
fi
command -v iptables-restore >/dev/null || die "iptables-restore is missing: runc checkpoint needs it"
# containerd 1.7 beside the system's 1.6, for the Kubernetes tests that run both: Debian 13's package
# unpacked into a private directory (never installed: the system containerd stays as it is).
CONTAINERD17_DIR=/opt/revenant-test/containerd-1.7
if ! "$CONTAINERD17_DIR/usr/bin/containerd" --version 2>/dev/null | grep -q ' 1\.7\.'; then
  ensure_trixie
  tmp=$(mktemp -d)
  log "unpacking containerd 1.7 from Debian 13 into $CONTAINERD17_DIR"
  (cd "$tmp" && apt-get download -qq containerd/trixie >/dev/null 2>&1) || die "apt-get download containerd/trixie (1.7) failed"
  rm -rf "$CONTAINERD17_DIR.new" && mkdir -p "$CONTAINERD17_DIR.new"
  dpkg -x "$tmp"/containerd_*.deb "$CONTAINERD17_DIR.new"
  rm -rf "$tmp" "$CONTAINERD17_DIR" && mv "$CONTAINERD17_DIR.new" "$CONTAINERD17_DIR"
  "$CONTAINERD17_DIR/usr/bin/containerd" --version | grep -q ' 1\.7\.' || die "the unpacked containerd is not 1.7"
fi

# Azurite (Microsoft's Azure Storage emulator) for the az:// store tests: a pinned npm package in a private
# prefix, with Debian's nodejs and npm when they are missing.
AZURITE_DIR=${REVENANT_AZURITE_DIR:-/opt/revenant-test/azurite}
AZURITE_VERSION=3.35.0
azurite_ok() {
  [ -x "$AZURITE_DIR/node_modules/.bin/azurite-blob" ] || return 1
  [ "$(node -p "require('$AZURITE_DIR/node_modules/azurite/package.json').version" 2>/dev/null)" = "$AZURITE_VERSION" ]
}
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  apt_update
  log "installing nodejs and npm (for Azurite)"
  apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
if ! azurite_ok; then
  log "installing azurite@$AZURITE_VERSION into $AZURITE_DIR"
  rm -rf "$AZURITE_DIR.new" && mkdir -p "$AZURITE_DIR.new"
  npm install --prefix "$AZURITE_DIR.new" --no-audit --no-fund --loglevel=error "azurite@$AZURITE_VERSION" >/dev/null ||
    die "npm install azurite@$AZURITE_VERSION failed"
  rm -rf "$AZURITE_DIR" && mv "$AZURITE_DIR.new" "$AZURITE_DIR"
fi
azurite_ok || die "azurite $AZURITE_VERSION is not in $AZURITE_DIR"

log "ok: $(containerd --version | awk '{print $1, $3}'), runc $(runc --version | awk 'NR==1{print $3}'), criu $(criu --version | sed -n 's/^Version: *//p'), $("$DOCKER_DIR/usr/sbin/dockerd" --version | cut -d, -f1) in $DOCKER_DIR"
