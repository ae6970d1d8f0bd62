#!/usr/bin/env bash
# Instructions (callgrind) or allocations (dhat) per proxied request.
# usage: benches/load/per_request.sh BINARY [callgrind|dhat]
# `spillway run` with spillway-core.yaml under valgrind, in front of
# `spillway upstream --body-bytes 64` (the same binary, not under valgrind);
# NGINX=1 puts nginx with nginx-proxy.conf (one process: no master) under
# valgrind instead, in front of the same upstream, for comparison;
# seq_client.py sends 20 requests to warm the upstream pool, then N1 and, in
# a fresh proxy, N2; (total(N2) - total(N1)) / (N2 - N1) leaves startup and
# shutdown out. dhat sees only the system allocator: give it a
# `--no-default-features` build. Only 127.0.0.1 is contacted; every process
# started is stopped on exit.
# Environment: N1 (500), N2 (2500), CONNS (1), FAST_PATH (true; `false`
# sets `http1_fast_path: false`: hyper serves every request).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN="$(realpath "${1:?usage: per_request.sh BINARY [callgrind|dhat]}")"
TOOL="${2:-callgrind}"
N1="${N1:-500}"; N2="${N2:-2500}"; CONNS="${CONNS:-1}"
WORK="$(mktemp -d /tmp/spillway-per-request-XXXXXX)"
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 600); do
    (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.2
  done
  echo "nothing listening on port $1" >&2; return 1
}

UP="$(port)"
"$BIN" upstream --bind "127.0.0.1:$UP" --body-bytes 64 > "$WORK/upstream.log" 2>&1 &
UP_PID=$!
PROXY_PID=""
cleanup() {
  [ -n "$PROXY_PID" ] && kill "$PROXY_PID" 2>/dev/null || true
  kill "$UP_PID" 2>/dev/null || true
}
trap cleanup EXIT
wait_port "$UP"

totals=()
for n in "$N1" "$N2"; do
  P="$(port)"; A="$(port)"
  sed -e "s/@PORT@/$P/; s/@ADMIN_PORT@/$A/; s/@UPSTREAM@/127.0.0.1:$UP/" \
    -e "/bind: 127.0.0.1:$P\$/a\\    http1_fast_path: ${FAST_PATH:-true}" \
    "$HERE/spillway-core.yaml" > "$WORK/core.yaml"
  case "$TOOL" in
    callgrind) args=(--tool=callgrind "--callgrind-out-file=$WORK/callgrind.$n.out") ;;
    dhat) args=(--tool=dhat "--dhat-out-file=$WORK/dhat.$n.out") ;;
    *) echo "unknown tool $TOOL" >&2; exit 2 ;;
  esac
  if [ "${NGINX:-0}" = 1 ]; then
    mkdir -p "$WORK/nginx-proxy-tmp"
    sed -e "s|@WORK@|$WORK|g; s/@PORT@/$P/; s/@UPSTREAM@/127.0.0.1:$UP/" \
      -e "s/^master_process on;/master_process off;/" \
      "$HERE/nginx-proxy.conf" > "$WORK/nginx.conf"
    valgrind "${args[@]}" nginx -p "$WORK" -e "$WORK/nginx.error.log" -c "$WORK/nginx.conf" \
      > "$WORK/proxy.$n.log" 2>&1 &
  else
    SPILLWAY_LOG=warn valgrind "${args[@]}" "$BIN" run --config "$WORK/core.yaml" \
      > "$WORK/proxy.$n.log" 2>&1 &
  fi
  PROXY_PID=$!
  wait_port "$P"
  python3 "$HERE/seq_client.py" "$P" 20 1
  python3 "$HERE/seq_client.py" "$P" "$n" "$CONNS"
  kill -TERM "$PROXY_PID"; wait "$PROXY_PID" || true; PROXY_PID=""
  if [ "$TOOL" = callgrind ]; then
    totals+=("$(grep -E '^(summary|totals):' "$WORK/callgrind.$n.out" | head -1 | awk '{print $2}')")
  else
    totals+=("$(grep -E '== Total:' "$WORK/proxy.$n.log" | sed -E 's/.*Total: *([0-9,]+) bytes in ([0-9,]+) blocks.*/\1 \2/; s/,//g')")
  fi
done
d=$((N2 - N1))
if [ "$TOOL" = callgrind ]; then
  echo "instructions per request: $(( (totals[1] - totals[0]) / d )) (totals ${totals[*]}; output in $WORK)"
else
  read -r b1 k1 <<< "${totals[0]}"; read -r b2 k2 <<< "${totals[1]}"
  python3 -c "print(f'allocations per request: {($k2 - $k1) / $d:.1f}, bytes: {($b2 - $b1) / $d:,.0f} (output in $WORK)')"
fi
