#!/usr/bin/env bash
# Profile-guided build of spillway: an instrumented build serves a training
# load for a few seconds (scripts/pgo/train.yaml: HTTP/1.1 on the fast path
# and through hyper, h2c to HTTP/1.1 and HTTP/2 upstreams, TLS, 1 MiB bodies
# both ways, a route table, overload with shedding and retries), with
# `spillway upstream` (the same binary) as the service; LLVM merges the
# profiles and the final build uses them to lay out hot and cold code.
#
#   bash scripts/pgo-build.sh          # -> target/pgo/spillway
#
# Environment: PROFILE (dist: the Docker image's and the benchmarks'
# build; release builds quicker, for checking this script), TRAIN_SECS
# (4, per load step). Needs llvm-profdata from rustup's llvm-tools component
# (added when missing), wrk, h2load and openssl (apt packages wrk,
# nghttp2-client and openssl, installed when missing). Sends traffic to
# 127.0.0.1 only; every process it starts is stopped on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROFILE="${PROFILE:-dist}"
TRAIN_SECS="${TRAIN_SECS:-4}"
OUT="$ROOT/target/pgo"
HOST="$(rustc -vV | sed -n 's/^host: //p')"
say() { echo "pgo-build: $*" >&2; }

# --- tools --------------------------------------------------------------------
PROFDATA="$(rustc --print sysroot)/lib/rustlib/$HOST/bin/llvm-profdata"
if [ ! -x "$PROFDATA" ]; then
  say "adding rustup component llvm-tools (for llvm-profdata)"
  rustup component add llvm-tools >&2
fi
[ -x "$PROFDATA" ] || { say "no llvm-profdata at $PROFDATA"; exit 1; }
missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  say "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >&2
fi

# --- instrumented build ---------------------------------------------------------
# An explicit --target keeps RUSTFLAGS off build scripts and proc macros:
# only spillway and the crates it links are instrumented.
build() {
  (cd "$ROOT" && RUSTFLAGS="$1" cargo build --profile "$PROFILE" --locked --bin spillway \
    --target "$HOST" --target-dir "$2" >&2)
}
rm -rf "$OUT/train"
mkdir -p "$OUT/train/discard"
say "instrumented build ($PROFILE profile)"
build "-Cprofile-generate=$OUT/train/discard" "$OUT/gen"
BIN="$OUT/gen/$HOST/$PROFILE/spillway"

# --- training load --------------------------------------------------------------
# `port NAME` sets NAME to a free port: below the kernel's ephemeral range
# (so no outgoing connection holds it), one nothing answers on, not handed
# out before.
EPHEMERAL_LOW="$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)"
USED=" "
port() {
  local p
  while :; do
    p=$((10000 + RANDOM % (EPHEMERAL_LOW - 10000)))
    [[ "$USED" == *" $p "* ]] && continue
    (echo > "/dev/tcp/127.0.0.1/$p") 2>/dev/null && continue
    USED+="$p "; printf -v "$1" '%s' "$p"; return 0
  done
}
wait_port() {
  for _ in $(seq 1 300); do
    (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  say "nothing listening on port $1"; return 1
}
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

port H1; port H2; port HYPER; port TLS; port ADMIN; port UP; port BIG; port SLOW
# A throwaway certificate for the TLS listener (wrk does not verify it).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 365 \
  -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$OUT/train/tls.key" -out "$OUT/train/tls.crt" 2>/dev/null
# The simulated upstreams are the same binary: their profiles train
# `spillway upstream`, which the load benchmarks and the demo run.
LLVM_PROFILE_FILE="$OUT/train/up-%p.profraw" "$BIN" upstream --bind "127.0.0.1:$UP" \
  --body-bytes 64 > "$OUT/train/upstream.log" 2>&1 &
PIDS+=($!)
LLVM_PROFILE_FILE="$OUT/train/up-%p.profraw" "$BIN" upstream --bind "127.0.0.1:$BIG" \
  --body-bytes 1048576 > "$OUT/train/upstream-big.log" 2>&1 &
PIDS+=($!)
# 8 at a time, 2 ms each (~4,000 req/s), 5% answered 503: retried, or shed
LLVM_PROFILE_FILE="$OUT/train/up-%p.profraw" "$BIN" upstream --bind "127.0.0.1:$SLOW" \
  --capacity 8 --service-time 2ms --fail-rate 0.05 > "$OUT/train/upstream-slow.log" 2>&1 &
PIDS+=($!)
sed -e "s/@H1_PORT@/$H1/; s/@H2_PORT@/$H2/; s/@HYPER_PORT@/$HYPER/; s/@TLS_PORT@/$TLS/" \
  -e "s/@ADMIN_PORT@/$ADMIN/; s/@UP_PORT@/$UP/; s/@BIG_PORT@/$BIG/; s/@SLOW_PORT@/$SLOW/" \
  -e "s|@CERT@|$OUT/train/tls.crt|; s|@KEY@|$OUT/train/tls.key|" \
  "$ROOT/scripts/pgo/train.yaml" > "$OUT/train/train.yaml"
wait_port "$UP"; wait_port "$BIG"; wait_port "$SLOW"
LLVM_PROFILE_FILE="$OUT/train/proxy-%p.profraw" SPILLWAY_LOG=warn "$BIN" run \
  --config "$OUT/train/train.yaml" > "$OUT/train/proxy.log" 2>&1 &
PROXY=$!
PIDS+=("$PROXY")
wait_port "$H1"; wait_port "$H2"; wait_port "$HYPER"; wait_port "$TLS"

# Each step must answer 2xx: a profile of error replies would train the wrong paths.
wrk_step() {
  local out
  out="$(wrk -t1 "$@")"
  if grep -qE "Non-2xx|Socket errors: connect [1-9]|read [1-9]" <<< "$out"; then
    say "training step failed: wrk $*"; echo "$out" >&2; exit 1
  fi
  say "wrk $*: $(sed -n 's/^Requests\/sec: *//p' <<< "$out") req/s"
}
# Overload: most replies are 503s (shed, or the upstream's), which is the point.
shed_step() {
  local out
  out="$(wrk -t1 "$@")"
  grep -q "^Requests/sec" <<< "$out" || { say "training step failed: wrk $*"; echo "$out" >&2; exit 1; }
  say "wrk $*: $(sed -n 's/^Requests\/sec: *//p' <<< "$out") req/s, $(sed -n 's/^ *Non-2xx or 3xx responses: *//p' <<< "$out") not 2xx"
}
h2_step() {
  local out
  out="$(h2load -t1 "$@")"
  if ! grep -qE "requests: [0-9]+ total, [0-9]+ started, ([0-9]+) done, \1 succeeded, 0 failed" <<< "$out"; then
    say "training step failed: h2load $*"; echo "$out" >&2; exit 1
  fi
  say "h2load $*: $(sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' <<< "$out") req/s"
}
D="${TRAIN_SECS}s"
wrk_step -c64 -d"$D" "http://127.0.0.1:$H1/"
wrk_step -c256 -d"$D" "http://127.0.0.1:$H1/"
wrk_step -c64 -d"$D" "http://127.0.0.1:$HYPER/"
wrk_step -c16 -d"$D" "https://127.0.0.1:$TLS/"
wrk_step -c16 -d"$D" -H "Connection: close" "https://127.0.0.1:$TLS/"
wrk_step -c16 -d"$D" -H "x-tenant: red" "http://127.0.0.1:$H1/orders/12345/items"
# One second: shed replies are cheap, and more would outweigh the rest.
shed_step -c64 -d1s "http://127.0.0.1:$H1/shed/"
wrk_step -c16 -d"$D" "http://127.0.0.1:$H1/big/file"
BODY_BYTES=1048576 wrk_step -c16 -d"$D" -s "$ROOT/benches/load/wrk-upload.lua" "http://127.0.0.1:$H1/upload"
h2_step -c16 -m16 -D "$TRAIN_SECS" "http://127.0.0.1:$H2/"
# A gRPC-shaped unary call: a 5-byte frame header and 32 bytes of message.
printf '\0\0\0\0\040%032d' 0 > "$OUT/train/grpc-body.bin"
h2_step -c16 -m16 -D "$TRAIN_SECS" -d "$OUT/train/grpc-body.bin" -H "content-type: application/grpc" \
  -H "te: trailers" "http://127.0.0.1:$H2/bench.Echo/Unary"

# Profiles are written when a process exits: a graceful stop, then wait.
for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
for p in "${PIDS[@]}"; do
  wait "$p" || { say "an instrumented process (pid $p) did not exit cleanly"; exit 1; }
done
PIDS=()
ls "$OUT"/train/proxy-*.profraw > /dev/null 2>&1 || { say "the proxy wrote no profile"; exit 1; }
"$PROFDATA" merge -o "$OUT/spillway.profdata" "$OUT"/train/*.profraw

# --- final build ----------------------------------------------------------------
say "profile-guided build ($PROFILE profile)"
build "-Cprofile-use=$OUT/spillway.profdata" "$OUT/use"
install -m 0755 "$OUT/use/$HOST/$PROFILE/spillway" "$OUT/spillway"
say "built $OUT/spillway"
