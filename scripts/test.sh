#!/usr/bin/env bash
# The project's test command:
#
#   scripts/test.sh [extra cargo-nextest arguments, e.g. -E 'binary(broker_smoke)']
#
# 1. installs (if needed) and starts a private tansu broker (scripts/tansu.sh) and
#    exports OUTBOX_TEST_KAFKA_BROKERS=127.0.0.1:PORT and OUTBOX_TEST_REQUIRE_KAFKA=1,
#    so the real-broker tests fail, rather than skip, when the broker is missing;
# 2. runs the doc tests: cargo test --workspace --doc   (skip with OUTBOX_SKIP_DOCTESTS=1);
# 3. runs everything else: cargo nextest run --workspace --no-fail-fast
#    (last, so that nextest's "Summary ... tests run" line closes the output);
# 4. stops the broker on exit, whatever happened, and exits non-zero if any step failed.
#
# Needs: the Rust toolchain with cargo-nextest, python3 with pip (tansu install), and
# PostgreSQL / MariaDB on 127.0.0.1 for the database tests.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# A run dir of our own: never stop a broker someone else started.
export OUTBOX_TANSU_RUN_DIR=${OUTBOX_TANSU_RUN_DIR:-$ROOT/target/tansu/test-$$}

cleanup() {
  local rc=$?
  "$ROOT/scripts/tansu.sh" stop || true
  if [[ -f $OUTBOX_TANSU_RUN_DIR/tansu.log && $rc -ne 0 ]]; then
    echo "test.sh: tansu log kept at $OUTBOX_TANSU_RUN_DIR/tansu.log" >&2
  elif [[ $rc -eq 0 ]]; then
    rm -rf "$OUTBOX_TANSU_RUN_DIR"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

t0=$SECONDS
addr=$("$ROOT/scripts/tansu.sh" start)
export OUTBOX_TEST_KAFKA_BROKERS=$addr
export OUTBOX_TEST_REQUIRE_KAFKA=1
echo "test.sh: tansu at $addr (OUTBOX_TEST_KAFKA_BROKERS), ready after $((SECONDS - t0))s" >&2

doc_rc=0
if [[ ${OUTBOX_SKIP_DOCTESTS:-0} != 1 ]]; then
  echo "test.sh: cargo test --workspace --doc" >&2
  t1=$SECONDS
  cargo test --workspace --doc || doc_rc=$?
  echo "test.sh: doc tests exit $doc_rc after $((SECONDS - t1))s" >&2
fi

echo "test.sh: cargo nextest run --workspace --no-fail-fast $*" >&2
t2=$SECONDS
nextest_rc=0
cargo nextest run --workspace --no-fail-fast "$@" || nextest_rc=$?
echo "test.sh: nextest exit $nextest_rc after $((SECONDS - t2))s" >&2

if ((doc_rc != 0 || nextest_rc != 0)); then
  echo "test.sh: FAILED (doc tests exit $doc_rc, nextest exit $nextest_rc)" >&2
  exit 1
fi
echo "test.sh: all green in $((SECONDS - t0))s" >&2
