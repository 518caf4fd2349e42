#!/usr/bin/env bash
# One command for every benchmark: builds Airlock and the harness (release), installs the
# Python clients, generates TPC-H (SF, default 1) when benches/tpch/data/ is empty, runs the
# criterion benches, then benches/run.py, which measures the rest side by side and rewrites
# docs/BENCHMARKS.md. Needs `protoc` for the peer server (Debian: protobuf-compiler).
#
#   benches/run.sh                 # everything, ~15 min on 2 cores once built
#   RUNS=3 SECONDS_=10 benches/run.sh   # quicker, for a look
#   benches/run.sh --no-criterion  # everything but the criterion benches (no second build)
#   benches/run.sh --soak          # only the soak (issue 15): 64 ADBC clients for 10 min
#                                  # against the demo with a SIGKILL + restart halfway;
#                                  # SOAK_SECONDS, SOAK_CLIENTS, SOAK_SCALE to change it
#   benches/run.sh --state         # only the shared state: SQLite vs PostgreSQL per query
#   benches/run.sh --cluster       # only TPC-H through one process vs one front end and two
#                                  # workers (issue 13); RUNS to change the rounds
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
HARNESS_TARGET="${HARNESS_TARGET_DIR:-$TARGET/harness}"
VENV="$TARGET/bench-venv"

if ! command -v protoc >/dev/null; then
  echo "protoc is needed to build the peer server: apt-get install protobuf-compiler" >&2
  exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check -r benches/requirements.txt

if [ "${1:-}" = "--soak" ]; then
  echo "[bench] building (release)"
  CARGO_TARGET_DIR="$TARGET" cargo build --locked --release --bin airlock
  exec "$VENV/bin/python" benches/soak.py --airlock "$TARGET/release/airlock" \
    --clients "${SOAK_CLIENTS:-64}" --seconds "${SOAK_SECONDS:-600}" \
    --scale "${SOAK_SCALE:-1}" --json "$TARGET/soak-results.json"
fi

if [ "${1:-}" = "--state" ]; then
  echo "[bench] building (release)"
  CARGO_TARGET_DIR="$TARGET" cargo build --locked --release --bin airlock
  exec "$VENV/bin/python" benches/state.py --airlock "$TARGET/release/airlock" \
    --json "$TARGET/state-results.json"
fi

if [ ! -f benches/tpch/data/lineitem.parquet ]; then
  CARGO_TARGET_DIR="$TARGET" benches/tpch/generate.sh
fi

if [ "${1:-}" = "--cluster" ]; then
  echo "[bench] building (release)"
  CARGO_TARGET_DIR="$TARGET" cargo build --locked --release --bin airlock
  exec "$VENV/bin/python" benches/cluster.py --airlock "$TARGET/release/airlock" \
    --runs "${RUNS:-5}" --json "$TARGET/cluster-results.json"
fi

echo "[bench] building (release)"
CARGO_TARGET_DIR="$TARGET" cargo build --locked --release --bin airlock
CARGO_TARGET_DIR="$HARNESS_TARGET" cargo build --locked --release --bins \
  --manifest-path benches/harness/Cargo.toml

CRITERION=(--criterion "$TARGET/criterion")
if [ "${1:-}" = "--no-criterion" ]; then
  # The criterion benches build Airlock once more with its dev-dependencies' features
  # (a second release build of DataFusion); skip them for a quicker run.
  shift
  CRITERION=()
else
  echo "[bench] criterion: rewrite and planning"
  CARGO_TARGET_DIR="$TARGET" cargo bench --locked --bench rewrite --bench planning -- \
    --warm-up-time 1 --measurement-time 3 --noplot
fi

"$VENV/bin/python" benches/run.py \
  --airlock "$TARGET/release/airlock" \
  --harness "$HARNESS_TARGET/release" \
  "${CRITERION[@]}" \
  --runs "${RUNS:-7}" --seconds "${SECONDS_:-30}" \
  --json "$TARGET/bench-results.json" "$@"
