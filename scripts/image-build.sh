#!/usr/bin/env bash
# Builds twill's container image from the Dockerfile, as a user with a registry would, on a
# machine that reaches no registry: local stand-ins for the two base images the Dockerfile names
# are made first and tagged exactly as its FROM lines name them, then `podman build` runs the
# unchanged Dockerfile with --pull=never. Then the image is checked: every program and path
# kube-flannel.yml and Flannel's own DaemonSet use must be in it, and /opt/bin/flanneld must run.
#
#   scripts/image-build.sh              image tag from TWILL_IMAGE (default localhost/twill:test)
#
# The stand-ins:
# - debian:bookworm-…-slim: debootstrap --variant=minbase bookworm, shaped like Debian's slim
#   image (its apt sources, its dpkg excludes, no apt lists), then `podman import`.
# - rust:1.95.0-slim-bookworm: built on that, laid out as the official rust:slim image
#   (RUSTUP_HOME=/usr/local/rustup, CARGO_HOME=/usr/local/cargo, rustup's proxies on PATH,
#   ca-certificates gcc libc6-dev), with this machine's own rustup toolchain of that version
#   copied in: no toolchain can be downloaded here.
# Each carries a label with a hash of what it was made from (the recipe, and for the Rust one
# the toolchain's files and the Debian stand-in's id); a stand-in whose label matches is kept,
# so a second run goes straight to the build.
#
# The build fetches Debian packages and crates only. This machine's HTTPS goes through a proxy
# whose CA only the host trusts, so the build gets the host's trust store as a read-only volume
# (cargo reads it); nothing of it is written into any image. (A RUN step that installs Debian's
# ca-certificates would fail on that read-only mount; the build stage's base already has it.)
#
# Runs use runc and cgroupfs (crun refuses this kernel's hybrid cgroup layout), explicit ulimits,
# and --network none: nothing here creates a network in the root namespace.
#
# Root only. Temporary roots are removed also when it fails.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

image=${TWILL_IMAGE:-localhost/twill:test}
mirror=${TWILL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
label=org.twill.standin-recipe

say() { echo "image-build: $*"; }
die() {
  echo "image-build: $*" >&2
  exit 1
}

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, podman build)"
for tool in podman runc debootstrap rustc; do
  command -v "$tool" >/dev/null || die "$tool missing (scripts/install-deps.sh installs it)"
done

# The base images exactly as the Dockerfile names them.
bases=$(sed -n 's/^FROM \([^ ]*\).*/\1/p' Dockerfile | sort -u)
debian_tag=$(grep -x 'docker.io/library/debian:bookworm-[0-9]*-slim' <<<"$bases") ||
  die "the Dockerfile names no docker.io/library/debian:bookworm-<date>-slim base: $bases"
rust_tag=$(grep -x 'docker.io/library/rust:[0-9.]*-slim-bookworm' <<<"$bases") ||
  die "the Dockerfile names no docker.io/library/rust:<version>-slim-bookworm base: $bases"
[ "$(wc -l <<<"$bases")" -eq 2 ] || die "the Dockerfile names bases this script makes no stand-in for: $bases"
rust_version=${rust_tag#docker.io/library/rust:}
rust_version=${rust_version%-slim-bookworm}

# Explicit ulimits: podman's default for both (1048576) is above what this machine lets it set
# (root here lacks CAP_SYS_RESOURCE, so no hard limit can be raised: the open-files limit can be
# at most this shell's, and podman itself runs with 32768 processes; 4096 is plenty for the
# checks below).
nofile=$(ulimit -Hn)
if [ "$nofile" = unlimited ] || [ "$nofile" -gt 1048576 ]; then
  nofile=1048576
fi
run_opts=(--runtime runc --cgroup-manager cgroupfs)
container_opts=(--rm --network none --ulimit "nofile=$nofile:$nofile" --ulimit nproc=4096:4096)

# Storage: overlay where the kernel has it, else vfs. Written once to the system's storage.conf
# when there is none (podman's built-in default is overlay, so a store made before agrees);
# an existing storage.conf is the machine owner's choice and is left as it is.
if [ ! -e /etc/containers/storage.conf ]; then
  modprobe overlay 2>/dev/null || true
  driver=vfs
  grep -qw overlay /proc/filesystems && driver=overlay
  mkdir -p /etc/containers
  printf '# Written by twill scripts/image-build.sh: %s is what this kernel supports.\n[storage]\ndriver = "%s"\nrunroot = "/run/containers/storage"\ngraphroot = "/var/lib/containers/storage"\n' \
    "$driver" "$driver" >/etc/containers/storage.conf
fi
driver=$(podman info --format '{{.Store.GraphDriverName}}') || die "podman info failed"
say "podman storage driver: $driver"

tmpdirs=()
cleanup() {
  local d m
  for d in "${tmpdirs[@]}"; do
    # debootstrap mounts /proc and friends inside its target; a failed run can leave them.
    for m in $(awk -v d="$d/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r); do
      umount -l "$m" 2>/dev/null || true
    done
    rm -rf --one-file-system "$d"
  done
}
trap cleanup EXIT

standin_label() { # TAG -> the recipe label of a local image, empty when there is none
  podman image inspect --format "{{index .Labels \"$label\"}}" "$1" 2>/dev/null || true
}

make_debian_standin() { # TAG HASH
  local root
  root=$(mktemp -d /var/tmp/twill-standin-debian.XXXXXX)
  tmpdirs+=("$root")
  chmod 755 "$root" # apt fetches as user _apt
  debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1 || {
    tail -20 "$root.log" >&2
    rm -f "$root.log"
    die "debootstrap bookworm from $mirror failed"
  }
  rm -f "$root.log"
  # Debian's image takes packages from bookworm, its updates and its security archive.
  rm -f "$root/etc/apt/sources.list"
  cat >"$root/etc/apt/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  # What makes Debian's image "slim": no docs, man pages or translations, now or from later
  # installs; no services started by package scripts; no apt lists or cached packages.
  cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
EOF
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  rm -rf "$root"/usr/share/{groff,info,linda,lintian/overrides,locale,man}/*
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod 755 "$root/usr/sbin/policy-rc.d"
  echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/var/log/apt/* "$root"/var/log/dpkg.log "$root"/var/log/bootstrap.log
  : >"$root/etc/resolv.conf"
  : >"$root/etc/hostname"
  tar --numeric-owner --xattrs -C "$root" -cf - . |
    podman import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["bash"]' \
      --change "LABEL $label=$2" \
      - "$1" >/dev/null
  rm -rf --one-file-system "$root"
}

make_rust_standin() { # TAG HASH SYSROOT RUSTUP VERSION BASE
  local ctx
  ctx=$(mktemp -d /var/tmp/twill-standin-rust.XXXXXX)
  tmpdirs+=("$ctx")
  # The official image's recipe, with the toolchain copied from the host instead of downloaded
  # by rustup-init (docs left out, as the official minimal profile has none).
  cat >"$ctx/Containerfile" <<EOF
FROM $6
ENV RUSTUP_HOME=/usr/local/rustup \\
    CARGO_HOME=/usr/local/cargo \\
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    RUST_VERSION=$5
RUN set -eu; \\
    apt-get update; \\
    apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev; \\
    rm -rf /var/lib/apt/lists/*; \\
    host=\$(/host-toolchain/bin/rustc -vV | sed -n 's/^host: //p'); \\
    toolchain="\$RUSTUP_HOME/toolchains/\$RUST_VERSION-\$host"; \\
    mkdir -p "\$toolchain" "\$CARGO_HOME/bin"; \\
    tar -C /host-toolchain --exclude=./share/doc -cf - . | tar -C "\$toolchain" -xf -; \\
    cp /host-rustup "\$CARGO_HOME/bin/rustup"; \\
    for proxy in cargo cargo-clippy cargo-fmt clippy-driver rustc rustdoc rustfmt rust-gdb rust-gdbgui rust-lldb; do \\
      ln -s rustup "\$CARGO_HOME/bin/\$proxy"; \\
    done; \\
    printf 'version = "12"\\ndefault_toolchain = "%s"\\nprofile = "minimal"\\n' "\$RUST_VERSION-\$host" >"\$RUSTUP_HOME/settings.toml"; \\
    chmod -R a+w "\$RUSTUP_HOME" "\$CARGO_HOME"; \\
    rustup --version; cargo --version; rustc --version
LABEL $label=$2
CMD ["bash"]
EOF
  podman build --pull=never --isolation chroot --network host --layers=false \
    --volume "$3:/host-toolchain:ro" --volume "$4:/host-rustup:ro" \
    -f "$ctx/Containerfile" -t "$1" "$ctx" >"$ctx.log" 2>&1 || {
    tail -30 "$ctx.log" >&2
    rm -f "$ctx.log"
    die "building the Rust stand-in $1 failed"
  }
  rm -f "$ctx.log"
}

t_start=$(date +%s)

# The Debian stand-in: remade when its recipe changes.
debian_hash=$({
  declare -f make_debian_standin
  echo "$debian_tag"
} | sha256sum | cut -c1-16)
if [ "$(standin_label "$debian_tag")" = "$debian_hash" ]; then
  say "$debian_tag: stand-in up to date ($debian_hash)"
else
  say "$debian_tag: making the stand-in (debootstrap --variant=minbase bookworm from $mirror)"
  t0=$(date +%s)
  make_debian_standin "$debian_tag" "$debian_hash"
  say "$debian_tag: made in $(($(date +%s) - t0)) s"
fi

# The Rust stand-in: the host's rustup toolchain of the Dockerfile's Rust version.
sysroot=$(rustc "+$rust_version" --print sysroot 2>/dev/null || rustc --print sysroot)
host_rustc=$("$sysroot/bin/rustc" -V)
case "$host_rustc" in
  "rustc $rust_version "*) ;;
  *) die "the Dockerfile's $rust_tag needs a Rust $rust_version toolchain on this machine; $sysroot has $host_rustc" ;;
esac
rustup_bin=$(command -v rustup) || die "rustup missing: the Rust stand-in carries rustup's proxies, as the official image does"
rustup_bin=$(readlink -f "$rustup_bin")
rust_hash=$({
  declare -f make_rust_standin
  echo "$rust_tag"
  podman image inspect --format '{{.Id}}' "$debian_tag"
  "$sysroot/bin/rustc" -vV
  sha256sum <"$rustup_bin"
  (cd "$sysroot" && find . -path ./share/doc -prune -o -printf '%P %s %T@\n' | sort)
} | sha256sum | cut -c1-16)
if [ "$(standin_label "$rust_tag")" = "$rust_hash" ]; then
  say "$rust_tag: stand-in up to date ($rust_hash)"
else
  say "$rust_tag: making the stand-in (toolchain $sysroot)"
  t0=$(date +%s)
  make_rust_standin "$rust_tag" "$rust_hash" "$sysroot" "$rustup_bin" "$rust_version" "$debian_tag"
  say "$rust_tag: made in $(($(date +%s) - t0)) s"
fi

say "podman build -t $image (the Dockerfile as it is, --pull=never)"
t0=$(date +%s)
podman build --pull=never --isolation chroot --network host \
  --volume /etc/ssl/certs:/etc/ssl/certs:ro \
  -t "$image" "$repo"
say "podman build: $(($(date +%s) - t0)) s"

# What kube-flannel.yml runs and names (its commands, the paths it copies), what Flannel's own
# DaemonSet runs (/opt/bin/flanneld, and /opt/bin/install-conf from v0.28.6 on: changing only
# the image of a Flannel install must work),
# and the programs twilld and twill-policy call (nft; iptables-restore for EnableNFTables=false;
# modprobe for br_netfilter). Each must be an executable file in the image, found in its PATH.
required=(/bin/sh /flannel /opt/bin/install-cni.sh /opt/bin/twilld /opt/bin/twill-policy /opt/bin/flanneld /opt/bin/install-conf
  cp mv nft iptables-restore ip6tables-restore iptables ip6tables modprobe
  /opt/cni/plugins/bridge /opt/cni/plugins/host-local /opt/cni/plugins/portmap /opt/cni/plugins/loopback)
for p in $(grep -o -E '(^|[ "])/(opt/bin/[A-Za-z0-9._-]+|flannel)\b' kube-flannel.yml | tr -d ' "'); do
  [[ " ${required[*]} " == *" $p "* ]] || required+=("$p")
done

check_image() { # IMAGE PATH...: names each one missing; 1 when any is, 2 when the run failed
  local image=$1 rc=0
  shift
  podman "${run_opts[@]}" run "${container_opts[@]}" --entrypoint /bin/sh "$image" -c '
    missing=0
    for p in "$@"; do
      case "$p" in
        /*) [ -f "$p" ] && [ -x "$p" ] && continue ;;
        *) command -v "$p" >/dev/null && continue ;;
      esac
      echo "missing from the image: $p" >&2
      missing=1
    done
    exit $missing' sh "$@" || rc=$?
  case $rc in
    0 | 1) return $rc ;;
    *) echo "podman run of $image failed (exit $rc)" >&2; return 2 ;;
  esac
}

say "checking $image holds: ${required[*]}"
check_image "$image" "${required[@]}" || die "$image lacks what kube-flannel.yml or Flannel's DaemonSet needs"

# The check must be able to fail: the same image without /opt/bin/flanneld must not pass it.
control="$image-check-control"
ctx=$(mktemp -d /var/tmp/twill-check-control.XXXXXX)
tmpdirs+=("$ctx")
printf 'FROM %s\nRUN rm /opt/bin/flanneld\n' "$image" |
  podman build --pull=never --isolation chroot --network host --layers=false -q -t "$control" -f - "$ctx" >/dev/null
if out=$(check_image "$control" "${required[@]}" 2>&1); then
  podman rmi "$control" >/dev/null
  die "the image check passed an image without /opt/bin/flanneld"
fi
podman rmi "$control" >/dev/null
grep -qx 'missing from the image: /opt/bin/flanneld' <<<"$out" ||
  die "the image check failed the control image for another reason than /opt/bin/flanneld: $out"

version=$(podman "${run_opts[@]}" run "${container_opts[@]}" --entrypoint /opt/bin/flanneld "$image" --version) ||
  die "/opt/bin/flanneld --version failed in $image"
say "/opt/bin/flanneld --version: $version"
case "$version" in
  "twilld "*) ;;
  *) die "/opt/bin/flanneld --version printed '$version', not twilld's version" ;;
esac

# iptables mode: Debian's iptables defaults to the nf_tables backend (the alternative
# iptables -> xtables-nft-multi), the one to use on kernels where nftables is the native API;
# a node whose rules are in the legacy backend is not served by this image.
backend=$(podman "${run_opts[@]}" run "${container_opts[@]}" --entrypoint iptables-restore "$image" --version)
say "iptables-restore --version: $backend"
case "$backend" in
  *"(nf_tables)"*) ;;
  *) die "iptables-restore in $image is not the nf_tables backend: $backend" ;;
esac

size=$(podman image inspect --format '{{.Size}}' "$image")
say "$image: $((size / 1024 / 1024)) MiB; all steps $(($(date +%s) - t_start)) s"
