#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for N minutes each (default 5), one after
# another, with cargo-fuzz on the nightly toolchain.
#
#   bash scripts/fuzz.sh            # 5 minutes per target
#   bash scripts/fuzz.sh 1          # 1 minute per target
#   TARGETS="h1_response config" bash scripts/fuzz.sh 10
#
# Needs `rustup toolchain install nightly` and `cargo install cargo-fuzz`.
# The seeds in fuzz/corpus/<target>/ are read, never written: what a run
# discovers goes to fuzz/work/<target>/ (not in git), and each run starts
# from both. A crash or a hang stops that target and leaves its input in
# fuzz/artifacts/<target>/; the script goes on with the next target and
# lists every artifact at the end. To keep a finding, copy the input into
# fuzz/corpus/<target>/ under a descriptive name and add a regression test
# for it to tests/fuzz_corpus.rs.
set -uo pipefail

minutes="${1:-5}"
case "$minutes" in
  '' | *[!0-9]*) echo "usage: $0 [minutes per target]" >&2; exit 2 ;;
esac
seconds=$((minutes * 60))
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"

targets="${TARGETS:-h1_response request_head server_head config grpc_timeout certificate}"
failed=()
for t in $targets; do
  mkdir -p "work/$t" "artifacts/$t"
  echo "== $t: ${minutes} min"
  # -timeout: one input taking a second is a hang; -rss_limit_mb: an input
  # that makes a target allocate without bound is a crash.
  if ! cargo +nightly fuzz run "$t" "work/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout=1 -rss_limit_mb=2048 -max_len=16384 \
    -print_final_stats=1; then
    failed+=("$t")
  fi
done

echo
found=$(find artifacts -type f 2>/dev/null | sort)
if [ -n "$found" ]; then
  echo "artifacts (reproduce with: cd fuzz && cargo +nightly fuzz run <target> <file>):"
  echo "$found" | sed 's/^/  fuzz\//'
else
  echo "no artifacts"
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "targets that stopped on a finding: ${failed[*]}"
  exit 1
fi
