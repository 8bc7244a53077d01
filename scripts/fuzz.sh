#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time each (TWILL_FUZZ_SECS, default 20),
# starting from the seeds in fuzz/seeds/<target>. A crash fails the script and leaves the input
# in fuzz/artifacts/<target>/.
#
# Stable toolchain only: `-s none` builds without AddressSanitizer (which needs nightly's
# -Zsanitizer); the coverage instrumentation and libFuzzer that cargo-fuzz uses work on stable.
# Safe Rust's panics, overflow checks and debug assertions are what the targets catch.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${TWILL_FUZZ_SECS:-20}"

command -v cargo-fuzz >/dev/null || {
  echo "fuzz: cargo-fuzz missing (scripts/install-deps.sh installs it)" >&2
  exit 1
}

echo "== cargo fuzz build (all targets)"
cargo fuzz build -s none --debug-assertions
for t in $(cargo fuzz list); do
  mkdir -p "corpus/$t"
  echo "== cargo fuzz run $t (${secs}s)"
  log="$(mktemp)"
  rc=0
  cargo fuzz run -s none --debug-assertions "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1 || rc=$?
  grep -E '^stat::(number_of_executed_units|new_units_added|peak_rss_mb)' "$log" || true
  if [ "$rc" -ne 0 ]; then
    tail -n 60 "$log" >&2
    echo "fuzz: $t failed (exit $rc); inputs in fuzz/artifacts/$t/" >&2
    rm -f "$log"
    exit 1
  fi
  rm -f "$log"
done
