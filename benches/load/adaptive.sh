#!/usr/bin/env bash
# Adaptive concurrency under a changing upstream capacity: a fixed cap of 8 vs
# `max_in_flight: auto`, 800 req/s for 60 s while the upstream's capacity goes
# 8 -> 16 -> 4. Writes benches/load/results-adaptive.{md,csv} and
# docs/adaptive-limit.png. See benches/load/README.md.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
export PATH="$HOME/.cargo/bin:$PATH"

command -v taskset >/dev/null 2>&1 || { echo "taskset missing (apt-get install util-linux)" >&2; exit 1; }
if ! command -v oha >/dev/null 2>&1; then
  echo "installing oha (cargo install oha --locked; compiles for several minutes)" >&2
  cargo install oha --locked ${OHA_JOBS:+-j "$OHA_JOBS"} >&2
fi

# The release profile (no LTO, 16 codegen units): the figures in
# docs/benchmarks.md for this scenario come from it, not from `dist`.
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  (cd "$ROOT" && cargo build --release --locked >&2)
fi
export SPILLWAY_BIN="${SPILLWAY_BIN:-$TARGET/release/spillway}"

# matplotlib for the plot only, in a venv under the target dir
VENV="$TARGET/bench-venv"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import matplotlib' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q matplotlib >&2
fi

# adaptive.py kills every process it started when it exits, also on SIGTERM;
# the trap forwards Ctrl-C / termination of this script to it.
RUNNER=""
cleanup() {
  trap - EXIT INT TERM
  if [ -n "$RUNNER" ] && kill -0 "$RUNNER" 2>/dev/null; then
    kill -TERM "$RUNNER" 2>/dev/null || true
    wait "$RUNNER" 2>/dev/null || true
  fi
}
trap cleanup EXIT INT TERM

echo "load before: $(uptime)" >&2
# bounded: two 60 s runs plus start-up; killed (TERM, then KILL) if it overruns
timeout -k 10 300 python3 "$HERE/adaptive.py" run &
RUNNER=$!
wait "$RUNNER"
RUNNER=""
echo "load after: $(uptime)" >&2
"$VENV/bin/python" "$HERE/adaptive.py" plot "$HERE/results-adaptive.csv" "$ROOT/docs/adaptive-limit.png"
echo "wrote $HERE/results-adaptive.md, $HERE/results-adaptive.csv, $ROOT/docs/adaptive-limit.png" >&2
