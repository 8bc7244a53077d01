#!/usr/bin/env bash
# Installs the system packages twill's build, lab and tests need (Debian bookworm), once.
# Idempotent: a package already installed is not fetched again.
set -euo pipefail

packages=(
  etcd-server etcd-client          # the registry (real etcd in the lab) and etcdctl
  nftables                         # nft: nftables-mode masquerade rules, the underlay guard, the policy table
  iptables                         # iptables(-restore/-save): masquerade rules in iptables mode (Flannel's default)
  containernetworking-plugins      # bridge, host-local, loopback, portmap in /usr/lib/cni
  protobuf-compiler libprotobuf-dev  # protoc and its well-known .proto files (descriptor.proto), for etcd-client's build script
  iproute2 iputils-ping iperf3     # the lab: ip/bridge, reachability, throughput
  ca-certificates openssl          # TLS material for the etcd TLS tests
  procps psmisc                    # ps/pkill/killall used by lab cleanup
  kmod                             # modprobe: twill-policy loads br_netfilter when missing
  gcc libc6-dev                    # the linker (cc) and C runtime rustc links with; C in build scripts
  debootstrap                      # scripts/fresh-root-test.sh and image-build.sh: fresh Debian roots
  podman runc                      # scripts/image-build.sh builds and runs the image; deploy's daemonset_lab runs kube-flannel.yml's containers (runc: crun refuses hybrid cgroups)
  python3                          # the policy lab tests' TCP/UDP/SCTP probe servers
  curl                             # deploy's daemonset_lab: the kubelet's HTTP probes
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's etcd-server package starts a system etcd on 127.0.0.1:2379 in the root namespace;
# the lab runs its own etcd inside a namespace and never talks to that one, but stop it so
# nothing listens that the project did not start.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
  systemctl stop etcd || true
fi

command -v cargo >/dev/null || { echo "install-deps: cargo is required (rustup)" >&2; exit 1; }

# cargo-fuzz for scripts/fuzz.sh (about 90 s to build on a 2-core machine; nothing is cached
# between CI runs). Runs on the stable toolchain with `-s none`.
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "install-deps: cargo install cargo-fuzz"
  cargo install cargo-fuzz --version 0.13.2 --locked --quiet
fi
