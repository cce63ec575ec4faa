#!/usr/bin/env bash
# CI smoke test of the fuzz targets: builds them with cargo-fuzz on nightly
# and runs each for FUZZ_SECONDS (default 20) starting from the committed
# seeds. Any crash, panic, leak or out-of-memory fails the script; the
# reproducer is left in fuzz/artifacts/<target>/.
#
# Installs what it needs when missing: the nightly toolchain (minimal
# profile) and cargo-fuzz. New inputs go to a temporary corpus, so the
# committed seeds are never modified.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-20}"
targets=(httpsig send_body jcs config)

if ! command -v rustup >/dev/null 2>&1; then
  echo "rustup is required" >&2
  exit 1
fi
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

# The machine is shared: build and fuzz at the lowest priority.
nice -n 19 cargo +nightly fuzz build

corpus="$(mktemp -d)"
trap 'rm -rf "$corpus"' EXIT

for target in "${targets[@]}"; do
  echo "== fuzz ${target}: ${seconds}s from fuzz/seeds/${target}"
  mkdir -p "${corpus}/${target}"
  # The first directory receives new inputs; the seeds are only read.
  nice -n 19 cargo +nightly fuzz run "${target}" \
    "${corpus}/${target}" "fuzz/seeds/${target}" -- \
    -max_total_time="${seconds}" -rss_limit_mb=2048 -print_final_stats=1
done
echo "fuzz smoke: ${#targets[@]} targets ran ${seconds}s each, no crash"
