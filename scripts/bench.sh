#!/usr/bin/env bash
# The benchmark command:
#
#   scripts/bench.sh [outbox-bench flags, e.g. --backlog 1000000 --large 10000000]
#   scripts/bench.sh --db both       # PostgreSQL and MariaDB
#   scripts/bench.sh --help          # every flag (--only, --quick, --relay-keys, ...)
#
# 1. builds the `outbox-bench` binary with --release;
# 2. starts a private tansu broker (scripts/tansu.sh, its own OUTBOX_TANSU_RUN_DIR);
# 3. runs the benchmark against PostgreSQL on 127.0.0.1:5432 (user postgres, trust;
#    a fresh database per run, dropped at the end) and that broker;
#    `--db postgres|mysql|both` (default postgres) picks the databases: `mysql` runs
#    sections a, b and i against MariaDB on 127.0.0.1:3306 instead (user root, no
#    password; likewise a fresh database per run; --mysql-url or OUTBOX_BENCH_MYSQL_URL
#    to change), `both` runs every section on PostgreSQL and then a, b and i on
#    MariaDB. MariaDB's are reported as their own sections, "a (MariaDB)" / "b (MariaDB)"
#    / "i (MariaDB)"; sections c, d, e, g, h and j run on PostgreSQL only (h creates a
#    second, fresh database there for its subscriber; `scripts/bench.sh --only h` runs
#    it alone, in about 5 minutes);
#    the baselines of issue #17: `--only i,j,c --db both` runs the drain against a lean
#    hand-written outbox (i), steady-rate commit -> received against it, quiet and with
#    a CPU hog (j: a child `sh` spinning on one core, killed after each block; `--hog
#    off|on|both`, `--steady-rates`, `--steady-deadline`) and commit -> handler against
#    a transactional raw consumer (c), in about 40 minutes with the defaults;
# 4. stops the broker and writes BENCHMARKS.md (the table, the machine, the settings;
#    the hand-written analysis in bench/NOTES.md is appended).
#
# Takes 20 minutes or more with the defaults (more with --db both). `--quick` tries
# the harness in a few minutes (`--only c`, say, for one section).
# Set OUTBOX_BENCH_BROKERS=mock (or pass --broker mock) to use librdkafka's mock
# cluster instead of tansu. Never run in CI (CI only compiles the binary).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

export OUTBOX_TANSU_RUN_DIR=${OUTBOX_TANSU_RUN_DIR:-$ROOT/target/tansu/bench-$$}
cleanup() {
  local rc=$?
  "$ROOT/scripts/tansu.sh" stop || true
  [[ $rc -eq 0 ]] && rm -rf "$OUTBOX_TANSU_RUN_DIR"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cargo build --release -p outbox-bench
if [[ ${OUTBOX_BENCH_BROKERS:-} == mock ]]; then
  broker=mock
else
  broker=$("$ROOT/scripts/tansu.sh" start)
fi
echo "bench.sh: broker $broker" >&2
OUTBOX_BENCH_NOTES=${OUTBOX_BENCH_NOTES:-$ROOT/bench/NOTES.md} \
  "$ROOT/target/release/outbox-bench" --broker "$broker" --out "$ROOT/BENCHMARKS.md" "$@"
echo "bench.sh: wrote $ROOT/BENCHMARKS.md" >&2
