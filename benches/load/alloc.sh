#!/usr/bin/env bash
# Spillway's global allocator compared: glibc malloc, mimalloc, jemalloc.
# usage: benches/load/alloc.sh            (PROFILE=dist for the shipped fat-LTO build)
# Builds one `spillway` binary per allocator (Cargo features; the three share
# CARGO_TARGET_DIR and are copied to distinct names), then runs alloc.py:
# instructions per request under callgrind, proxy CPU per request under wrk,
# RSS idle / after a burst / with 1,000 idle keep-alive connections. Prints a
# markdown table. Traffic stays on 127.0.0.1. A few minutes after the builds.
# Environment: PROFILE (release), SKIP_BUILD=1 (reuse the copies), and alloc.py's
# ROUNDS, DURATION, CG_N, BURST_CONNS, IDLE_CONNS.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
export PATH="$HOME/.cargo/bin:$PATH"
PROFILE="${PROFILE:-release}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="$TARGET/$PROFILE/alloc-bench"

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
missing=()
for tool in wrk valgrind taskset python3; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  pkgs=()
  for tool in "${missing[@]}"; do
    case "$tool" in taskset) pkgs+=(util-linux) ;; *) pkgs+=("$tool") ;; esac
  done
  echo "installing: ${pkgs[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${pkgs[@]}" >&2
fi
if ! command -v oha >/dev/null 2>&1; then
  echo "installing oha (cargo install oha --locked; compiles for several minutes)" >&2
  cargo install oha --locked >&2
fi

mkdir -p "$OUT"
build() { # name, cargo feature flags...
  local name="$1"; shift
  if [ "${SKIP_BUILD:-0}" != 1 ] || [ ! -x "$OUT/spillway-$name" ]; then
    echo "building $name ($PROFILE $*)" >&2
    local t0=$SECONDS
    (cd "$ROOT" && cargo build --profile "$PROFILE" --locked --bin spillway "$@" >&2)
    echo "  $name: $((SECONDS - t0)) s" >&2
    cp "$TARGET/$PROFILE/spillway" "$OUT/spillway-$name"
  fi
}
build mimalloc --no-default-features --features mimalloc
build glibc --no-default-features
build jemalloc --no-default-features --features jemalloc

cd "$HERE"
exec python3 "$HERE/alloc.py" \
  "mimalloc=$OUT/spillway-mimalloc" "glibc=$OUT/spillway-glibc" "jemalloc=$OUT/spillway-jemalloc"
