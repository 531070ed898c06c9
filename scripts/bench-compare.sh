#!/usr/bin/env bash
# Before/after of a change, in one run: builds `outbox-bench` at REV (in a temporary
# worktree) and at the working tree, then runs them alternately against one private
# tansu broker, so the two are measured under the same conditions.
#
#   scripts/bench-compare.sh REV [rounds] -- [outbox-bench flags]
#   scripts/bench-compare.sh main~5 2 -- --only b,c --backlog 50000 --rates 100,1000
#
# Reports land in target/bench-compare/{before,after}-<round>.md (each one a
# BENCHMARKS.md-style report with its own ratios against the raw baselines of the same
# run); compare the ratios, not the absolute figures. Never run in CI.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
rev=${1:?usage: scripts/bench-compare.sh REV [rounds] -- [outbox-bench flags]}
shift
rounds=2
if [[ ${1:-} =~ ^[0-9]+$ ]]; then rounds=$1; shift; fi
[[ ${1:-} == -- ]] && shift
out=$ROOT/target/bench-compare
mkdir -p "$out"
export OUTBOX_TANSU_RUN_DIR=$out/tansu
tree=$(mktemp -d)
cleanup() {
  local rc=$?
  "$ROOT/scripts/tansu.sh" stop || true
  git -C "$ROOT" worktree remove --force "$tree" 2>/dev/null || rm -rf "$tree"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

git worktree add --detach "$tree" "$rev" >/dev/null
# Separate target dirs: cargo hashes workspace crates by their path inside the
# workspace, so two checkouts sharing one target dir can reuse each other's builds.
CARGO_TARGET_DIR=$out/target-before cargo build --release -p outbox-bench --manifest-path "$tree/Cargo.toml"
cargo build --release -p outbox-bench
cp "$out/target-before/release/outbox-bench" "$out/outbox-bench-before"
cp "$ROOT/target/release/outbox-bench" "$out/outbox-bench-after"

broker=$("$ROOT/scripts/tansu.sh" start)
echo "bench-compare.sh: broker $broker; before = $rev, after = the working tree" >&2
for round in $(seq 1 "$rounds"); do
  for which in before after; do
    echo "bench-compare.sh: round $round, $which ($(cut -d' ' -f1 /proc/loadavg) load)" >&2
    "$out/outbox-bench-$which" --broker "$broker" --out "$out/$which-$round.md" "$@"
  done
done
echo "bench-compare.sh: reports in $out" >&2
