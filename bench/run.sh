#!/usr/bin/env bash
# Runs every benchmark (release build, root: each builds its own namespace lab) and adds the run
# (date, machine, command, one table) to the top of bench/RESULTS.md's runs, which keeps every
# earlier run below it. The README's Benchmarks section shows the newest run's table: copy it there.
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
run="$(mktemp)"
breakdown="$(mktemp)"
trap 'rm -f "$run" "$breakdown" "$out.tmp"' EXIT
{
  echo "## Run of $(date -u '+%Y-%m-%d %H:%M') UTC"
  echo
  echo "$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'); \`bench/run.sh\` at $(git rev-parse --short HEAD 2>/dev/null || echo 'an unknown commit')."
  echo
  echo "| benchmark | twill | peer or limit | ratio | target | |"
  echo "|---|---|---|---|---|---|"
  # Both sizes: 1000 peers and 5000 (each with its own targets, see convergence.rs).
  target/release/convergence --peers 1000 --rounds 5
  target/release/convergence --peers 5000 --rounds 5
  target/release/cni_latency --pods 300 --cni "$static_cni"
  target/release/datapath --rounds 9 --max-rounds 31 --seconds 4 --breakdown "$breakdown" --breakdown-rounds 9
  if [ -x target/release/policy_scale ]; then
    target/release/policy_scale --rounds 9 --seconds 4
  fi
  echo
  echo "Where the datapath's cost goes (\`datapath --breakdown\`): the hand-built Flannel path across nodes with one of twill's chains or tables added at a time."
  echo
  cat "$breakdown"
  echo
} | tee "$run"
# The new run goes before the first earlier one ("## Run of ..."), or at the end if there is none.
awk -v run="$run" '
  !done && /^## Run of / { while ((getline line < run) > 0) print line; done = 1 }
  { print }
  END { if (!done) while ((getline line < run) > 0) print line }
' "$out" > "$out.tmp"
mv "$out.tmp" "$out"
echo "added the run to $out"
