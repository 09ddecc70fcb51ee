#!/usr/bin/env bash
# The MCP server driven by the official MCP Python SDK, and /metrics parsed by the Prometheus Python client's
# text parser, against a real `kiln serve` with real VMs (tests/obs). Needs target/release/kiln (`make build`),
# the `tiny` image (`make image-tiny`) and python3 >= 3.10. Installs only into target/obs-venv.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
die() { printf 'error: %s\n' "$*" >&2; exit 2; }

export KILN_BIN="${KILN_BIN:-$ROOT/target/release/kiln}"
export KILN_TEST_IMAGES="${KILN_TEST_IMAGES:-${KILN_DATA_DIR:-$ROOT/.kiln-data}/images}"
[ -x "$KILN_BIN" ] || die "$KILN_BIN is missing: run \`make build\`"
[ -f "$KILN_TEST_IMAGES/tiny/image.json" ] || die "image 'tiny' is not built in $KILN_TEST_IMAGES: run \`make image-tiny\`"
unset KILN_SOCKET KILN_URL KILN_TOKEN

PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "the MCP SDK needs Python >= 3.10 ($("$PY" --version))"
VENV=target/obs-venv
mkdir -p target
if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    pyver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "python${pyver}-venv" \
      || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv
    "$PY" -m venv "$VENV"
  fi
fi
# The official MCP SDK and the Prometheus client (for its text-format parser).
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "mcp>=2.3,<3" "prometheus-client>=0.20" "pytest>=8"
cd tests/obs
exec "$ROOT/$VENV/bin/python" -m pytest -rsxf -p no:cacheprovider "$@"
