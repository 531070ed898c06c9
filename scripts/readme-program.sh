#!/usr/bin/env bash
# Builds and runs the README's "Your first service" program as a new user would: a
# fresh crate outside the workspace, made from the README's own text, so the two
# cannot drift.
#
#   scripts/readme-program.sh
#
# 1. extracts the blocks marked `<!-- readme-program: Cargo.toml -->` and
#    `<!-- readme-program: main.rs -->` from README.md (the fenced block right after
#    each marker);
# 2. writes them into a crate in a temporary directory, the `outbox-runtime = ...` line
#    replaced by a path dependency on this checkout (the only change), with this
#    repository's Cargo.lock and rust-toolchain.toml so the build reuses the workspace's
#    dependency builds (CARGO_TARGET_DIR, default <repo>/target);
# 3. creates a fresh PostgreSQL database (OUTBOX_TEST_PG_ADMIN_URL, default
#    postgres://postgres@127.0.0.1:5432/postgres) and uses the test broker
#    (OUTBOX_TEST_KAFKA_BROKERS; if unset, starts tansu with scripts/tansu.sh);
# 4. runs the program with DATABASE_URL and OUTBOX_KAFKA_BROKERS under a timeout
#    (OUTBOX_README_TIMEOUT, default 120 s) and fails unless it exits 0 and prints its
#    success line (`welcomed ...`).
#
# OUTBOX_README_FRESH_LOCK=1 resolves dependencies afresh instead (what a new user gets
# today from crates.io; slower: other versions are built).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
TIMEOUT=${OUTBOX_README_TIMEOUT:-120}
ADMIN_URL=${OUTBOX_TEST_PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}

log() { printf 'readme-program.sh: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# The fenced block after the marker `<!-- readme-program: $1 -->`, without its fences.
extract() {
  python3 - "$ROOT/README.md" "$1" <<'PY'
import sys
readme, name = sys.argv[1], sys.argv[2]
lines = open(readme, encoding="utf-8").read().split("\n")
marker = f"<!-- readme-program: {name} -->"
hits = [i for i, l in enumerate(lines) if l.strip() == marker]
if len(hits) != 1:
    sys.exit(f"README.md has {len(hits)} markers {marker!r}; expected exactly one")
i = hits[0] + 1
while i < len(lines) and not lines[i].strip():
    i += 1
if i >= len(lines) or not lines[i].startswith("```"):
    sys.exit(f"no fenced block right after {marker!r}")
end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
if end is None:
    sys.exit(f"the block after {marker!r} is not closed")
print("\n".join(lines[i + 1:end]))
PY
}

work=$(mktemp -d "${TMPDIR:-/tmp}/outbox-readme.XXXXXX")
db=outbox_readme_$$_$RANDOM
started_tansu=""
cleanup() {
  local rc=$?
  if [[ -n ${db_created:-} ]]; then
    psql "$ADMIN_URL" -q -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  fi
  if [[ -n $started_tansu ]]; then
    OUTBOX_TANSU_RUN_DIR=$started_tansu "$ROOT/scripts/tansu.sh" stop || true
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

command -v psql >/dev/null || die "psql not found (needed to create the program's database)"

mkdir -p "$work/src"
extract Cargo.toml >"$work/Cargo.toml"
extract main.rs >"$work/src/main.rs"
grep -q '^outbox-runtime = ' "$work/Cargo.toml" || die "the README's Cargo.toml has no 'outbox-runtime = ' line"
# The one change: the published version becomes this checkout.
sed -i "s|^outbox-runtime = .*|outbox-runtime = { path = \"$ROOT/outbox-runtime\" }|" "$work/Cargo.toml"
cp "$ROOT/rust-toolchain.toml" "$work/"
if [[ ${OUTBOX_README_FRESH_LOCK:-0} != 1 ]]; then
  cp "$ROOT/Cargo.lock" "$work/"
fi
log "crate in $work (outside the workspace: $(cd "$work" && cargo locate-project --workspace --message-format plain))"

t=$SECONDS
# The workspace's dev profile (Cargo.toml), so the dependency builds in the shared target
# dir are reused instead of built again with full debug info.
profile=(--config 'profile.dev.debug="line-tables-only"' --config 'profile.dev.package."*".debug=false')
(cd "$work" && cargo build "${profile[@]}") || die "the README program does not build"
log "built in $((SECONDS - t))s"

psql "$ADMIN_URL" -q -c "CREATE DATABASE $db" >/dev/null || die "cannot create database $db"
db_created=1
database_url="${ADMIN_URL%/*}/$db"

brokers=${OUTBOX_TEST_KAFKA_BROKERS:-}
if [[ -z $brokers ]]; then
  started_tansu="$CARGO_TARGET_DIR/tansu/readme-$$"
  brokers=$(OUTBOX_TANSU_RUN_DIR=$started_tansu "$ROOT/scripts/tansu.sh" start)
fi

log "running it: DATABASE_URL=$database_url OUTBOX_KAFKA_BROKERS=$brokers (timeout ${TIMEOUT}s)"
t=$SECONDS
rc=0
out=$(cd "$work" && DATABASE_URL=$database_url OUTBOX_KAFKA_BROKERS=$brokers \
  timeout "$TIMEOUT" cargo run --quiet "${profile[@]}") || rc=$?
printf '%s\n' "$out"
((rc == 0)) || die "the README program exited $rc after $((SECONDS - t))s"
grep -q '^welcomed ' <<<"$out" || die "the README program did not print its success line ('welcomed ...')"
log "passed in $((SECONDS - t))s"
