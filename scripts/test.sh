#!/usr/bin/env bash
# Runs the whole test suite against real components:
#   Rust unit and integration tests (one integration binary, servers on 127.0.0.1:0),
#   Python tests through the real ADBC Flight SQL driver and pyarrow.flight, and the
#   owner console in Debian's headless Chromium (selenium; screenshots in artifacts/),
#   the Python client package (clients/python) against a real server,
#   Java tests through the Apache Arrow Flight SQL JDBC driver from Maven Central,
#   the shared state against a real PostgreSQL server (Debian's, run as the postgres user).
# Installs what the tests need (a Python venv from PyPI, Maven artifacts, Debian's
# chromium, chromium-driver and postgresql) on first run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$CARGO_TARGET_DIR/debug/airlock"
summary=()

step() { printf '\n==> %s\n' "$*"; }

# Installs Debian packages (as root, or through password-less sudo).
apt_install() {
  if [ "$(id -u)" = 0 ]; then
    SUDO=""
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "$* missing; install them (apt-get install $*) or run as root" >&2
    exit 1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@"
}

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --locked --all-targets -- -D warnings

step "PostgreSQL for the shared-state tests (Debian's postgresql)"
if [ -z "${AIRLOCK_TEST_PG_BIN:-}" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  apt_install postgresql
fi
ls -d /usr/lib/postgresql/*/bin 2>/dev/null || echo "AIRLOCK_TEST_PG_BIN=$AIRLOCK_TEST_PG_BIN"

step "Rust tests"
rust_log=$(mktemp)
cargo test --locked --all-targets 2>&1 | tee "$rust_log"
rust_passed=$(grep -Eo 'test result: ok\. [0-9]+ passed' "$rust_log" | awk '{s += $4} END {print s + 0}')
summary+=("rust: $rust_passed passed")

step "Browser for the console test (Debian's chromium and chromium-driver)"
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  apt_install chromium chromium-driver
fi
chromium --version 2>/dev/null || true

step "Python tests (ADBC Flight SQL driver, pyarrow.flight, the console in headless Chromium)"
VENV="$CARGO_TARGET_DIR/test-venv"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
py_log=$(mktemp)
AIRLOCK_BIN="$BIN" "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/python 2>&1 | tee "$py_log"
py_passed=$(grep -Eo '[0-9]+ passed' "$py_log" | tail -1 | awk '{print $1}')
summary+=("python: ${py_passed:-0} passed")

step "Python client tests (clients/python against a real server)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e clients/python
client_log=$(mktemp)
AIRLOCK_BIN="$BIN" "$VENV/bin/python" -m pytest -q -p no:cacheprovider clients/python/tests 2>&1 | tee "$client_log"
client_passed=$(grep -Eo '[0-9]+ passed' "$client_log" | tail -1 | awk '{print $1}')
summary+=("python client: ${client_passed:-0} passed")

step "Java tests (Flight SQL JDBC driver)"
java_log=$(mktemp)
PKI=$(mktemp -d)
"$VENV/bin/python" tests/python/pki.py "$PKI" >/dev/null
(cd tests/java && mvn -B -ntp test -DairlockBin="$BIN" -DairlockPki="$PKI") 2>&1 | tee "$java_log"
java_passed=$(grep -E '^\[INFO\] Tests run: [0-9]+, Failures: 0, Errors: 0' "$java_log" | tail -1 | sed -E 's/.*Tests run: ([0-9]+).*/\1/')
summary+=("java: ${java_passed:-0} passed")

total=$((rust_passed + ${py_passed:-0} + ${client_passed:-0} + ${java_passed:-0}))
printf '\n'; printf '%s\n' "${summary[@]}"
echo "all: $total passed, 0 failed"
