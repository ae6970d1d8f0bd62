#!/usr/bin/env bash
# Installs what Spillway's tests need beyond the Rust toolchain, with apt-get,
# and only what is missing (running it again installs nothing):
#
#   chromium     tests/status_page.rs renders the /status page in a real
#                headless browser (the test fails, loudly, without it).
#   prometheus   its promtool parses the Grafana dashboard's queries (tests/k8s).
#   python3-venv tests/k8s runs pytest in a virtualenv (.ci/run creates it);
#                only when python3 cannot create one already.
#
# usage: bash scripts/test-deps.sh     (as root, or with sudo available)
set -euo pipefail

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
if ! command -v python3 >/dev/null 2>&1; then
  need+=(python3 python3-venv)
elif ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  need+=(python3-venv)
fi

if [ ${#need[@]} -eq 0 ]; then
  echo "test dependencies: all present"
  exit 0
fi

sudo=()
if [ "$(id -u)" != 0 ]; then sudo=(sudo); fi
echo "test dependencies: installing ${need[*]} (apt-get)"
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
