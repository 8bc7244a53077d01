#!/usr/bin/env bash
# The whole test suite: installs what it needs, checks formatting and lints, builds every
# binary and the container image, then runs unit tests and the lab tests (network namespaces,
# real etcd, nft and CNI plugins; root only: they skip with a message when not root, and fail
# in CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo build (binaries used by the lab tests)"
cargo build --workspace --bins --locked

# The container image, built from the Dockerfile as users build it (local stand-ins for the
# base images; root only, like the lab tests). The tests that run the image read its name
# from TWILL_IMAGE.
echo "== container image (scripts/image-build.sh)"
if [ "$(id -u)" -eq 0 ]; then
  export TWILL_IMAGE=${TWILL_IMAGE:-localhost/twill:test}
  scripts/image-build.sh
elif [ "${CI:-}" = true ]; then
  echo "the image build needs root, and CI=true" >&2
  exit 1
else
  echo "skipping: the image build needs root (debootstrap, podman); the tests that run the image skip too"
fi

before=$(ip netns list 2>/dev/null | awk '{print $1}' | sort)
echo "== cargo test"
# Each lab test brings up etcd and several daemons in namespaces of its own; two at a time
# suits a 2-core machine.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# --no-fail-fast: one failing test binary must not hide how the others fared.
status=0
cargo test --workspace --locked --no-fail-fast -- --test-threads="${TWILL_TEST_THREADS:-2}" 2>&1 | tee "$log" || status=$?

# One closing line for the whole suite, summed over every test binary.
summary() {
  awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"
}
summary
if [ "$status" -ne 0 ]; then
  echo "failed tests:" >&2
  grep -E '^test .* FAILED$' "$log" >&2 || true
  exit "$status"
fi

echo "== fuzz (each target ${TWILL_FUZZ_SECS:-20}s)"
scripts/fuzz.sh

# The install steps on a machine that has nothing: what this machine happens to have
# installed must not hide a missing package (root only, like the lab tests).
echo "== fresh root (debootstrap, install-deps.sh, build)"
if [ "$(id -u)" -eq 0 ]; then
  scripts/fresh-root-test.sh
elif [ "${CI:-}" = true ]; then
  echo "the fresh-root test needs root, and CI=true" >&2
  exit 1
else
  echo "skipping: the fresh-root test needs root (debootstrap, chroot)"
fi

after=$(ip netns list 2>/dev/null | awk '{print $1}' | sort)
leftover=$(comm -13 <(echo "$before") <(echo "$after"))
if [ -n "$leftover" ]; then
  echo "lab namespaces left behind by the tests:" >&2
  echo "$leftover" >&2
  exit 1
fi


# Repeated as the suite's closing line.
summary
