# shellcheck shell=bash
# What several scripts do alike (sourced; bash, `set -euo pipefail` already on):
#
#   repo                          # the repository's root; the sourcing script's working directory becomes it
#   step TEXT                     # a progress line: ==> TEXT
#   build_proxy_stack [QUIET]     # setup, then the filter (wasm32-wasip1), the supervisor, the bundled proxy (release)
#                                 # and the demo image: what scripts/demo, scripts/load-test and the benchmarks run
#   free_port                     # a free loopback TCP port
#   wait_http URL [TRIES]         # until URL answers 2xx (every 50 ms, 200 tries by default), or exit 1
#   track PID                     # PID is killed (and reaped) when the script exits, however it exits

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo" || exit 1

step() { printf '\n==> %s\n' "$*"; }

build_proxy_stack() {
  bash "$repo/scripts/setup" >/dev/null
  cargo build --quiet --release --target wasm32-wasip1 -p equilibrio-filter
  cargo build --quiet -p equilibrio-supervisor
  cargo build --quiet --release -p equilibrio-host
  bash "$repo/scripts/build-demo-image" >/dev/null
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_http() {
  local tries=${2:-200}
  for _ in $(seq 1 "$tries"); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "no answer from $1" >&2
  exit 1
}

tracked_pids=()
track() { tracked_pids+=("$1"); }
kill_tracked() {
  local p
  for p in "${tracked_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${tracked_pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap kill_tracked EXIT
