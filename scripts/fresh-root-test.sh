#!/usr/bin/env bash
# Proves the install steps on a machine that has nothing on it: a fresh Debian bookworm root
# (debootstrap --variant=minbase), this checkout copied in, scripts/install-deps.sh run inside
# it as on a new machine, then the workspace's binaries built there. A system package that the
# build needs and install-deps.sh forgets fails here, whatever the host has installed.
#
# Only the Rust toolchain comes from the host (no toolchain can be downloaded here): the
# host's rustup toolchain directory is mounted read-only and put on PATH. Cargo's registry
# and build directory are the fresh root's own, so crates are fetched as on a new machine.
# The host's CA bundle is handed to cargo by path, not installed into the root (this
# machine's HTTPS may be intercepted by a proxy only the host trusts).
#
# Root only. Removes everything it made, also when it fails.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

if [ "$(id -u)" -ne 0 ]; then
  echo "fresh-root-test: needs root (debootstrap, chroot)" >&2
  exit 1
fi
command -v debootstrap >/dev/null || { echo "fresh-root-test: debootstrap missing (scripts/install-deps.sh installs it)" >&2; exit 1; }

mirror=${TWILL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
toolchain=$(rustc --print sysroot)
ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
root=$(mktemp -d /var/tmp/twill-fresh-root.XXXXXX)
chmod 755 "$root" # a root directory others can enter: apt fetches as user _apt
mounts=()

cleanup() {
  local i
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
    umount -l "${mounts[$i]}" 2>/dev/null || true
  done
  rm -rf --one-file-system "$root"
}
trap cleanup EXIT

bind() { # bind SRC DST [ro]
  mkdir -p "$2"
  mount --bind "$1" "$2"
  mounts+=("$2")
  if [ "${3:-}" = ro ]; then
    mount -o remount,bind,ro "$2"
  fi
}

echo "== fresh root: debootstrap bookworm ($mirror) into $root"
t0=$(date +%s)
debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1 || {
  tail -20 "$root.log" >&2
  rm -f "$root.log"
  exit 1
}
rm -f "$root.log"
echo "debootstrap: $(($(date +%s) - t0)) s"

mkdir -p "$root/proc" "$root/dev"
mount -t proc proc "$root/proc"
mounts+=("$root/proc")
bind /dev "$root/dev"
bind /dev/pts "$root/dev/pts"
bind "$toolchain" "$root/opt/rust-toolchain" ro
cp "$ca" "$root/host-ca.crt"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# No package may start a service inside the root (etcd-server's postinst would).
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod +x "$root/usr/sbin/policy-rc.d"
# The checkout as committed plus local changes, without build output.
mkdir -p "$root/src/twill"
tar -C "$repo" --exclude=./target --exclude=./fuzz/target --exclude=./.git -cf - . | tar -C "$root/src/twill" -xf -

echo "== fresh root: scripts/install-deps.sh, then cargo build --workspace --bins --locked"
t0=$(date +%s)
chroot "$root" /usr/bin/env -i \
  HOME=/root \
  PATH=/opt/rust-toolchain/bin:/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  CARGO_HTTP_CAINFO=/host-ca.crt \
  SSL_CERT_FILE=/host-ca.crt \
  /bin/bash -c 'set -euo pipefail; cd /src/twill && scripts/install-deps.sh && cargo build --workspace --bins --locked'
echo "fresh root: install and build passed in $(($(date +%s) - t0)) s"
