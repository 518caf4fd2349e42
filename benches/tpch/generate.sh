#!/usr/bin/env bash
# Generates the TPC-H tables as Parquet under benches/tpch/data/ (scale factor SF,
# default 1) with tpchgen-cli from PyPI, installed into a virtual environment under the
# cargo target directory.
set -euo pipefail
cd "$(dirname "$0")"
SF="${SF:-1}"
TARGET="${CARGO_TARGET_DIR:-../../target}"
VENV="$TARGET/tpchgen-venv"
if [ ! -x "$VENV/bin/tpchgen-cli" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check tpchgen-cli==4.0.0
fi
mkdir -p data
"$VENV/bin/tpchgen-cli" parquet -s "$SF" --output-dir data
echo "$SF" > data/SCALE
echo "TPC-H SF$SF written to $(pwd)/data"
