#!/usr/bin/env bash
# DP mode against threshold mode (issue 11): the same TPC-H query on the same data, once
# through a server whose policy keeps tpch.lineitem in threshold mode (benches/tpch/policies)
# and once in DP mode (benches/tpch/policies-dp), median of RUNS wall times of
# `airlock sql` each (process start and connect included in both, so the ratio is what
# matters; target ≤ 1.3×). Needs benches/tpch/data (benches/tpch/generate.sh, SF via SF=).
#
#   benches/dp.sh               # RUNS=7
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET="${CARGO_TARGET_DIR:-$(pwd)/target}"
BIN="${AIRLOCK_BIN:-$TARGET/release/airlock}"
RUNS="${RUNS:-7}"
# Each run binds a different no-op bound ({bound}), so each is a new query: a DP repeat
# would be served its kept answer without executing.
DEFAULT_QUERY="SELECT l_returnflag, l_linestatus, count(*) AS n, sum(l_quantity) AS q, avg(l_extendedprice) AS p FROM tpch.lineitem WHERE l_shipdate <= DATE '1998-09-02' AND l_quantity < {bound} GROUP BY l_returnflag, l_linestatus"
QUERY="${QUERY:-$DEFAULT_QUERY}"
[ -x "$BIN" ] || { echo "build first: cargo build --release --bin airlock" >&2; exit 1; }
[ -f benches/tpch/data/lineitem.parquet ] || { echo "generate TPC-H first: benches/tpch/generate.sh" >&2; exit 1; }

PIDS="$(mktemp)"
trap 'kill $(cat "$PIDS") 2>/dev/null || true' EXIT
start() { # policy dir -> prints the address; the server's pid goes to $PIDS
  local state; state="$(mktemp -d)"
  "$BIN" serve --config benches/tpch/airlock.toml --policy-dir "$1" --state-dir "$state" \
    --listen 127.0.0.1:0 > "$state/out" 2>&1 &
  echo $! >> "$PIDS"
  for _ in $(seq 1 600); do
    addr="$(sed -n 's/^airlock listening on \(\S*\).*/\1/p' "$state/out" | head -1)"
    [ -n "$addr" ] && { echo "$addr"; return; }
    sleep 0.1
  done
  echo "server did not start: $(cat "$state/out")" >&2; exit 1
}

measure() { # address -> median seconds over RUNS (after one warm-up)
  local times=()
  for i in $(seq 0 "$RUNS"); do
    local t0 t1
    t0=$(date +%s.%N)
    local q; q="$(printf '%s' "$QUERY" | sed "s/{bound}/$((1000000 + i + RANDOM * 100))/")"
    "$BIN" sql --url "grpc://$1" --user bench_analyst --password bench_analyst "$q" > /dev/null \
      || { echo "query failed" >&2; exit 1; }
    t1=$(date +%s.%N)
    [ "$i" -gt 0 ] && times+=("$(echo "$t1 - $t0" | bc)")
  done
  printf '%s\n' "${times[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}

addr=$(start benches/tpch/policies)
threshold=$(measure "$addr")
addr=$(start benches/tpch/policies-dp)
dp=$(measure "$addr")
echo "threshold: ${threshold}s  dp: ${dp}s  ratio: $(echo "scale=2; $dp / $threshold" | bc)x (target ≤ 1.3x)"
