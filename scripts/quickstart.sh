#!/usr/bin/env bash
# The quick start: installs what it needs, builds twill, and brings up a 3-node cluster in
# network namespaces (etcd, twilld with VXLAN, two pods per node through the CNI plugin), prints
# the pod-to-pod reachability matrix, applies an example NetworkPolicy with twill-policy and
# prints the matrix again. The cluster stays up to explore; `scripts/quickstart.sh down`
# removes it. Needs root (network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "down" ]; then
  exec target/debug/twill-lab quickstart --down
fi
scripts/install-deps.sh
echo "==> building (cargo build --workspace --bins)"
cargo build --workspace --bins --locked --quiet
exec target/debug/twill-lab quickstart
