#!/usr/bin/env bash
# Runs every test on a fresh or set-up machine (idempotent: finished steps are skipped).
#   scripts/test.sh            all tests
#   scripts/test.sh -- ARGS    extra arguments for `cargo test` (e.g. a test name)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
bash scripts/setup-system.sh
export CLIPCAP_TEST_THREADS="${CLIPCAP_TEST_THREADS:-2}"
[ "${1:-}" = "--" ] && shift
# The default bundle is built by scripts/build-demo.sh; tests make their own small models.
cargo build --bin clipcap
cargo test -- --test-threads="$CLIPCAP_TEST_THREADS" "$@"
