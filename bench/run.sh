#!/usr/bin/env bash
# Runs every benchmark (release build, root: each builds its own namespace lab) and writes the
# table to bench/RESULTS.md with the date and the machine. Copy the table into the README.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --workspace --bins --locked --quiet
export TWILL_BIN_DIR="$PWD/target/release"
# twill-cni as images ship it: statically linked (see the Dockerfile).
triple="$(rustc -vV | sed -n 's/^host: //p')"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --quiet -p twill-cni --bins --target "$triple"
static_cni="$PWD/target/$triple/release/twill-cni"
out=bench/RESULTS.md
{
  echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')."
  echo
  echo "| benchmark | twill | peer or limit | ratio | target | |"
  echo "|---|---|---|---|---|---|"
  target/release/convergence --rounds 5
  target/release/cni_latency --pods 300 --cni "$static_cni"
  target/release/datapath --rounds 9 --seconds 5
  if [ -x target/release/policy_scale ]; then
    target/release/policy_scale --rounds 9 --seconds 4
  fi
} | tee "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out"
