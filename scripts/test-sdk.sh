#!/usr/bin/env bash
# SDK tests: the Python SDK (pytest, incl. every program in examples/) and the TypeScript SDK (node --test),
# against real `kiln serve` daemons with real VMs that the tests start and stop themselves.
# Needs target/release/kiln (`make build`), the `tiny` image (`make image-tiny`), python3 >= 3.10 and
# node >= 20 with npm. Installs only into sdk/python/.venv and sdk/typescript/node_modules.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }

export KILN_BIN="${KILN_BIN:-$ROOT/target/release/kiln}"
export KILN_TEST_IMAGES="${KILN_TEST_IMAGES:-${KILN_DATA_DIR:-$ROOT/.kiln-data}/images}"
[ -x "$KILN_BIN" ] || die "$KILN_BIN is missing: run \`make build\`"
[ -f "$KILN_TEST_IMAGES/tiny/image.json" ] || die "image 'tiny' is not built in $KILN_TEST_IMAGES: run \`make image-tiny\`"
# The tests start their own daemons; a daemon configured in the environment must not be used by mistake.
unset KILN_SOCKET KILN_URL KILN_TOKEN

PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || die "python3 is needed"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "the Python SDK needs Python >= 3.10 ($("$PY" --version))"
command -v node >/dev/null && command -v npm >/dev/null || die "node >= 20 and npm are needed"
[ "$(node -p 'process.versions.node.split(".")[0]')" -ge 20 ] || die "the TypeScript SDK needs node >= 20 ($(node --version))"

mkdir -p target
PY_LOG="$ROOT/target/sdk-pytest.log"
TAP_LOG="$ROOT/target/sdk-node.tap"

step "Python SDK: virtualenv in sdk/python/.venv"
VENV=sdk/python/.venv
if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    # Debian's python3 ships venv's pip bootstrap separately.
    rm -rf "$VENV"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    pyver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    echo "python3 -m venv failed; installing python${pyver}-venv"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "python${pyver}-venv" \
      || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv
    "$PY" -m venv "$VENV"
  fi
fi
# A regular (not editable) install, so the tests see the package as users get it (py.typed included).
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "./sdk/python[test,dev]"

step "TypeScript SDK: npm ci and build"
(cd sdk/typescript && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build)

status=0
started=$SECONDS

step "Python SDK: the sync client (src/kiln/_sync) is what unasync generates from src/kiln/_async"
"$VENV/bin/python" sdk/python/scripts/unasync.py --check || status=1

step "Python SDK tests (pytest; includes examples/)"
(cd sdk/python && "$ROOT/$VENV/bin/python" -m pytest -rsxf -p no:cacheprovider) 2>&1 | tee "$PY_LOG" || status=1

step "TypeScript SDK tests (node --test)"
(cd sdk/typescript && node --test --test-reporter=spec --test-reporter-destination=stdout \
  --test-reporter=tap --test-reporter-destination="$TAP_LOG" test/*.test.mjs) || status=1

step "SDK test summary ($((SECONDS - started)) s)"
printf 'python:     %s\n' "$(grep -E '(passed|failed|error)' "$PY_LOG" | tail -n1 | tr -d '=' | sed 's/^ *//')"
printf 'typescript: %s\n' "$(grep -E '^# (pass|fail|skipped|todo|cancelled) ' "$TAP_LOG" | tr '\n' ' ')"
if [ "$status" -ne 0 ]; then
  echo "SDK tests FAILED (logs: $PY_LOG, $TAP_LOG)"
fi
exit "$status"
