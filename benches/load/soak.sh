#!/usr/bin/env bash
# Spillway soak test. usage: benches/load/soak.sh [--minutes N]   (default 10)
#
# Mixed traffic for N minutes (HTTP/1.1 and h2c; GET, POST with unique ids, a
# streaming route; clients leaving mid-upload and mid-stream), the config
# rewritten with a changed cap every 5 s, an upstream fault every 30 s
# (killed and restarted; answering 503), the proxy's RSS, open fds,
# connections, in-flight and queue depth sampled every second. Writes
# soak.csv, soak.png and summary.json to $OUT (default <target>/soak) and
# prints the RSS and fd slopes, lost and duplicated POSTs and leaked permits;
# exits 1 if any POST was lost or duplicated or a permit leaked.
#
# Uses <target>/dist/spillway if present, else <target>/release/spillway
# (built if missing); <target> is $CARGO_TARGET_DIR or ./target. Python
# packages (matplotlib, h2) go into a venv under <target>.
set -euo pipefail

MINUTES=10
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) MINUTES="$2"; shift 2 ;;
    --minutes=*) MINUTES="${1#*=}"; shift ;;
    *) echo "usage: $0 [--minutes N]" >&2; exit 2 ;;
  esac
done

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
export PATH="$HOME/.cargo/bin:$PATH"

if [ -n "${SPILLWAY_BIN:-}" ]; then
  BIN="$SPILLWAY_BIN"
elif [ -x "$TARGET/dist/spillway" ]; then
  BIN="$TARGET/dist/spillway"
else
  if [ ! -x "$TARGET/release/spillway" ]; then
    (cd "$ROOT" && cargo build --release --locked >&2)
  fi
  BIN="$TARGET/release/spillway"
fi

VENV="$TARGET/soak-venv"
if ! "$VENV/bin/python" -c 'import matplotlib, h2, numpy' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q matplotlib h2 >&2
fi

OUT="${OUT:-$TARGET/soak}"
echo "soak: $BIN for $MINUTES min, results in $OUT" >&2
exec "$VENV/bin/python" "$HERE/soak.py" run --spillway "$BIN" --minutes "$MINUTES" --out "$OUT"
