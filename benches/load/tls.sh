#!/usr/bin/env bash
# TLS termination benchmark: full handshakes per second and
# keep-alive HTTPS requests per second through Spillway, nginx and HAProxy,
# each terminating the same certificate on loopback, side by side.
#
#   benches/load/tls.sh            # ~6 min with the defaults below
#
# Layout as in benches/load/README.md: the proxy under test and the upstream
# share APP_CPU (one worker/thread each), wrk runs on GEN_CPU. Only one proxy
# runs at a time; everything binds 127.0.0.1; every process started here is
# killed by its own process group on exit (Ctrl-C included).
#
# Metrics, per proxy and key type:
#   full handshakes/s  HS_PROCS parallel `openssl s_time -new` (connect, full
#                      handshake, close; never resumes a session).
#   reconnect req/s    wrk with `Connection: close`: a new TCP connection and
#                      handshake per request. wrk (OpenSSL, SSL_clear on
#                      reconnect) RESUMES sessions where the server allows it;
#                      the script measures and prints how many on nginx.
#   keep-alive req/s   wrk over HTTPS (HTTP/1.1), KA_CONNS connections.
#   CPU                the proxy's own CPU time (utime+stime of its process
#                      group, from /proc) per 1000 handshakes / requests.
# With 2 CPUs the generator gets one; an OpenSSL 3 client is slower at
# handshakes than the servers, so handshake rates are generator-bound and
# CPU per handshake is the figure that tells the proxies apart.
#
# Environment: ROUNDS (3), DURATION seconds per run (10), KEYS ("ecdsa rsa"),
# TARGETS ("nginx haproxy spillway"), HS_PROCS (8), RC_CONNS (32),
# KA_CONNS (64), APP_CPU / GEN_CPU (1st / 2nd allowed CPU), SKIP_BUILD=1,
# SPILLWAY_BIN, KEEP_WORK=1 (keep the work directory).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
export PATH="$HOME/.cargo/bin:$PATH"

ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-10}"
KEYS="${KEYS:-ecdsa rsa}"
TARGETS="${TARGETS:-nginx haproxy spillway}"
HS_PROCS="${HS_PROCS:-8}"
RC_CONNS="${RC_CONNS:-32}"
KA_CONNS="${KA_CONNS:-64}"
CPUS=($(python3 -c 'import os; print(" ".join(map(str, sorted(os.sched_getaffinity(0)))))'))
APP_CPU="${APP_CPU:-${CPUS[0]}}"
GEN_CPU="${GEN_CPU:-${CPUS[1]:-${CPUS[0]}}}"
CLK_TCK="$(getconf CLK_TCK)"
PORT=18443
UP_PORT=18080
ADMIN_PORT=19901

# --- tools, by package name -------------------------------------------------
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
missing=()
for tool in wrk nginx haproxy openssl taskset python3; do
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
  for svc in nginx haproxy; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
      $SUDO systemctl stop "$svc" || true
    fi
  done
fi
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  (cd "$ROOT" && cargo build --profile dist --locked >&2)
fi
SPILLWAY="${SPILLWAY_BIN:-$ROOT/target/dist/spillway}"

WORK="$(mktemp -d /tmp/spillway-tls-XXXXXX)"
echo "work directory: $WORK" >&2

# --- process handling ---------------------------------------------------------
PGIDS=()
cleanup() {
  for pg in "${PGIDS[@]:-}"; do
    [ -n "$pg" ] && kill -TERM -- "-$pg" 2>/dev/null || true
  done
  sleep 0.3
  for pg in "${PGIDS[@]:-}"; do
    [ -n "$pg" ] && kill -KILL -- "-$pg" 2>/dev/null || true
  done
  if [ "${KEEP_WORK:-0}" != 1 ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME CPU CMD...: runs CMD in its own session pinned to CPU; sets STARTED to its pgid.
start() {
  local name="$1" cpu="$2"
  shift 2
  setsid taskset -c "$cpu" "$@" >>"$WORK/$name.log" 2>&1 </dev/null &
  STARTED=$!
  PGIDS+=("$STARTED")
}

stop_group() {
  local pg="$1"
  kill -TERM -- "-$pg" 2>/dev/null || true
  for _ in $(seq 50); do
    kill -0 -- "-$pg" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL -- "-$pg" 2>/dev/null || true
}

wait_port() {
  python3 - "$1" <<'EOF'
import socket, sys, time
port = int(sys.argv[1]); end = time.time() + 15
while time.time() < end:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close(); sys.exit(0)
    except OSError:
        time.sleep(0.05)
sys.exit("port %d never opened" % port)
EOF
}

# CPU ticks (utime+stime) of every process in process group $1.
group_ticks() {
  local pg="$1" total=0 f line rest
  for f in /proc/[0-9]*/stat; do
    line="$(cat "$f" 2>/dev/null)" || continue
    rest="${line##*) }"
    # fields after "comm": state ppid pgrp ... utime(12th) stime(13th)
    set -- $rest
    [ "${3:-}" = "$pg" ] || continue
    total=$((total + ${12} + ${13}))
  done
  echo "$total"
}

# --- certificates (openssl, made fresh for this run) --------------------------
gen_certs() {
  local kind="$1" dir="$WORK/certs-$kind" newkey
  mkdir -p "$dir"
  case "$kind" in
    ecdsa) newkey=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1) ;;
    rsa) newkey=(-newkey rsa:2048) ;;
    *) echo "unknown key type $kind" >&2; exit 2 ;;
  esac
  openssl req -x509 "${newkey[@]}" -nodes -keyout "$dir/ca.key" -out "$dir/ca.crt" \
    -subj "/CN=spillway bench CA" -days 2 2>/dev/null
  openssl req "${newkey[@]}" -nodes -keyout "$dir/tls.key" -out "$dir/tls.csr" \
    -subj "/CN=localhost" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$dir/ext.cnf"
  openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -CAcreateserial -out "$dir/tls.crt" -days 2 -extfile "$dir/ext.cnf" 2>/dev/null
  cat "$dir/tls.crt" "$dir/tls.key" >"$dir/haproxy.pem"
}

# --- proxy configs ------------------------------------------------------------
write_configs() {
  local kind="$1" dir="$WORK/certs-$kind"
  mkdir -p "$WORK/nginx-tmp"
  cat >"$WORK/nginx-$kind.conf" <<EOF
worker_processes 1;
daemon off;
master_process on;
pid $WORK/nginx.pid;
error_log $WORK/nginx.error.log warn;
worker_rlimit_nofile 65536;
events { worker_connections 16384; }
http {
    log_format reuse "\$ssl_session_reused";
    access_log ${NGINX_ACCESS_LOG:-off};
    client_body_temp_path $WORK/nginx-tmp/body;
    proxy_temp_path $WORK/nginx-tmp/proxy;
    fastcgi_temp_path $WORK/nginx-tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx-tmp/uwsgi;
    scgi_temp_path $WORK/nginx-tmp/scgi;
    keepalive_requests 100000;
    keepalive_timeout 75s;
    upstream app {
        server 127.0.0.1:$UP_PORT;
        keepalive 64;
        keepalive_requests 100000;
    }
    server {
        listen 127.0.0.1:$PORT ssl http2 backlog=4096;
        ssl_certificate $dir/tls.crt;
        ssl_certificate_key $dir/tls.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
  cat >"$WORK/haproxy-$kind.cfg" <<EOF
global
    nbthread 1
    maxconn 8000
    ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
    mode http
    maxconn 8000
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    http-reuse always
frontend fe
    bind 127.0.0.1:$PORT ssl crt $dir/haproxy.pem alpn h2,http/1.1
    default_backend be
backend be
    http-reuse always
    server app 127.0.0.1:$UP_PORT
EOF
  cat >"$WORK/spillway-$kind.yaml" <<EOF
version: 1
listeners:
  - name: inbound
    bind: 127.0.0.1:$PORT
    max_connections: 20000
    tls:
      cert: $dir/tls.crt
      key: $dir/tls.key
admin:
  bind: 127.0.0.1:$ADMIN_PORT
runtime:
  worker_threads: 1
upstreams:
  app:
    endpoints: ["127.0.0.1:$UP_PORT"]
routes:
  - name: all
    match:
      path_prefix: /
    upstream: app
EOF
}

start_proxy() {
  local target="$1" kind="$2"
  case "$target" in
    nginx) start nginx "$APP_CPU" nginx -c "$WORK/nginx-$kind.conf" -p "$WORK" ;;
    haproxy) start haproxy "$APP_CPU" haproxy -db -f "$WORK/haproxy-$kind.cfg" ;;
    spillway) SPILLWAY_LOG=warn start spillway "$APP_CPU" "$SPILLWAY" run --config "$WORK/spillway-$kind.yaml" ;;
    *) echo "unknown target $target" >&2; exit 2 ;;
  esac
  PROXY_PG="$STARTED"
  wait_port "$PORT"
}

# run_wrk SECONDS CONNS EXTRA...: sets W_RPS and W_ERRS (socket errors + non-2xx).
run_wrk() {
  local secs="$1" conns="$2"
  shift 2
  local out errs non2xx
  out="$(taskset -c "$GEN_CPU" wrk -t1 -c"$conns" -d"${secs}s" "$@" "https://127.0.0.1:$PORT/" 2>&1)"
  echo "$out" >>"$WORK/wrk.log"
  W_RPS="$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")"
  errs="$(awk '/Socket errors:/ {gsub(",", ""); print $4 + $6 + $8 + $10}' <<<"$out")"
  non2xx="$(awk '/Non-2xx/ {print $NF}' <<<"$out")"
  W_RPS="${W_RPS:-0}"
  W_ERRS=$((${errs:-0} + ${non2xx:-0}))
}

# run_stime SECONDS: HS_PROCS parallel `openssl s_time -new`; sets W_RPS
# (full handshakes per second, all processes) and W_ERRS (processes that failed).
run_stime() {
  local secs="$1" i total=0 n pids=()
  for i in $(seq "$HS_PROCS"); do
    taskset -c "$GEN_CPU" openssl s_time -connect "127.0.0.1:$PORT" -new -time "$secs" \
      >"$WORK/stime.$i.out" 2>&1 </dev/null &
    pids+=($!)
  done
  W_ERRS=0
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || W_ERRS=$((W_ERRS + 1))
  done
  for i in $(seq "$HS_PROCS"); do
    cat "$WORK/stime.$i.out" >>"$WORK/stime.log"
    n="$(awk '/connections in .* real seconds/ {print $1}' "$WORK/stime.$i.out")"
    [ -n "$n" ] || W_ERRS=$((W_ERRS + 1))
    total=$((total + ${n:-0}))
  done
  W_RPS="$(python3 -c "print('%.1f' % ($total / $secs))")"
}

# measure TARGET KIND MODE: sets M_RATE (per second), M_CPU (proxy CPU ms per
# 1000 requests or handshakes) and M_ERRS.
measure() {
  local target="$1" kind="$2" mode="$3" args=() run=run_wrk conns="$KA_CONNS"
  case "$mode" in
    handshake) run=run_stime conns="" ;;
    reconnect) conns="$RC_CONNS" args=(-H "Connection: close") ;;
  esac
  start_proxy "$target" "$kind"
  # warm-up (connections, pools, caches), not measured
  $run 2 $conns "${args[@]}"
  local t0 t1
  t0="$(group_ticks "$PROXY_PG")"
  $run "$DURATION" $conns "${args[@]}"
  t1="$(group_ticks "$PROXY_PG")"
  stop_group "$PROXY_PG"
  M_RATE="$W_RPS"
  M_ERRS="$W_ERRS"
  M_CPU="$(python3 -c "print('%.1f' % (($t1 - $t0) * 1000.0 / $CLK_TCK / max(float('$W_RPS') * $DURATION / 1000.0, 1e-9)))")"
}

median() { python3 -c 'import statistics,sys; v=[float(x) for x in sys.argv[1:]]; print("%.1f" % statistics.median(v))' "$@"; }

# --- run ----------------------------------------------------------------------
start upstream "$APP_CPU" "$SPILLWAY" upstream --bind "127.0.0.1:$UP_PORT" --threads 1 --body-bytes 2
wait_port "$UP_PORT"

declare -A HS HS_CPU RC RC_CPU KA KA_CPU ERRS
for kind in $KEYS; do
  gen_certs "$kind"
  write_configs "$kind"
done

# Does the load generator resume sessions? Checked once against nginx's log.
kind0="${KEYS%% *}"
NGINX_ACCESS_LOG="$WORK/nginx-access.log reuse" write_configs "$kind0"
start_proxy nginx "$kind0"
run_wrk 1 4 -H "Connection: close"
stop_group "$PROXY_PG"
reused="$(grep -c '^r$' "$WORK/nginx-access.log" || true)"
total="$(wc -l <"$WORK/nginx-access.log")"
RESUMPTION="wrk resumed $reused of $total sessions on nginx"
echo "wrk check: $RESUMPTION" >&2
write_configs "$kind0"

for round in $(seq "$ROUNDS"); do
  for kind in $KEYS; do
    for target in $TARGETS; do
      for mode in handshake reconnect keepalive; do
        measure "$target" "$kind" "$mode"
        v="$M_RATE" cpu="$M_CPU" errs="$M_ERRS"
        key="$target/$kind"
        case "$mode" in
          handshake) HS[$key]="${HS[$key]:-} $v"; HS_CPU[$key]="${HS_CPU[$key]:-} $cpu" ;;
          reconnect) RC[$key]="${RC[$key]:-} $v"; RC_CPU[$key]="${RC_CPU[$key]:-} $cpu" ;;
          *) KA[$key]="${KA[$key]:-} $v"; KA_CPU[$key]="${KA_CPU[$key]:-} $cpu" ;;
        esac
        ERRS[$key]=$(( ${ERRS[$key]:-0} + errs ))
        echo "round $round $kind $target $mode: $v/s, ${cpu} ms CPU per 1000, $errs errors" >&2
      done
    done
  done
done

# --- report -------------------------------------------------------------------
{
  echo "## TLS termination: Spillway vs nginx vs HAProxy"
  echo
  echo "$(date -u +%Y-%m-%d) · $(uname -srm) · $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') ·" \
    "proxy+upstream on CPU $APP_CPU, wrk on CPU $GEN_CPU · median of $ROUNDS rounds × ${DURATION}s ·" \
    "full handshakes: $HS_PROCS × \`openssl s_time -new\` · reconnects: wrk $RC_CONNS conns, \`Connection: close\` ($RESUMPTION) · keep-alive: wrk $KA_CONNS conns, HTTP/1.1 ·" \
    "$(nginx -v 2>&1 | sed 's/.*version: //'), HAProxy $(haproxy -v | head -1 | awk '{print $3}'), OpenSSL $(openssl version | awk '{print $2}'), Spillway rustls 0.23 + ring"
  echo
  echo "Rates are per second (higher is better); CPU is the proxy's own CPU time in ms per 1000 handshakes or requests (lower is better); ± is against nginx."
  echo
  echo "| key | proxy | full handshakes/s | CPU/1k | reconnect req/s | CPU/1k | keep-alive req/s | CPU/1k | errors |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
  rel() { python3 -c "a=float('$1'); b=float('$2'); print('%+.0f%%' % ((a/b-1)*100) if b > 0 else '-')"; }
  for kind in $KEYS; do
    local_n() { median ${1:-0}; }
    nhs="$(local_n "${HS[nginx/$kind]:-}")"; nhsc="$(local_n "${HS_CPU[nginx/$kind]:-}")"
    nrc="$(local_n "${RC[nginx/$kind]:-}")"; nrcc="$(local_n "${RC_CPU[nginx/$kind]:-}")"
    nka="$(local_n "${KA[nginx/$kind]:-}")"; nkac="$(local_n "${KA_CPU[nginx/$kind]:-}")"
    for target in $TARGETS; do
      key="$target/$kind"
      hs="$(median ${HS[$key]})"; hsc="$(median ${HS_CPU[$key]})"
      rc="$(median ${RC[$key]})"; rcc="$(median ${RC_CPU[$key]})"
      ka="$(median ${KA[$key]})"; kac="$(median ${KA_CPU[$key]})"
      label="$kind"; [ "$kind" = ecdsa ] && label="ECDSA P-256"; [ "$kind" = rsa ] && label="RSA 2048"
      if [ "$target" = nginx ]; then
        echo "| $label | $target | $hs | $hsc | $rc | $rcc | $ka | $kac | ${ERRS[$key]} |"
      else
        echo "| $label | $target | $hs ($(rel "$hs" "$nhs")) | $hsc ($(rel "$hsc" "$nhsc")) | $rc ($(rel "$rc" "$nrc")) | $rcc ($(rel "$rcc" "$nrcc")) | $ka ($(rel "$ka" "$nka")) | $kac ($(rel "$kac" "$nkac")) | ${ERRS[$key]} |"
      fi
    done
  done
} | tee "$HERE/results-tls.md"
