#!/usr/bin/env bash
# `make test`: lint, then every test (unit tests and integration tests that boot real VMs).
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy -D warnings"
cargo clippy --release --workspace --all-targets -- -D warnings
step "cargo test (unit + integration; integration tests boot real VMs)"
export KILN_TEST_IMAGES="${KILN_DATA_DIR:-$PWD/.kiln-data}/images"
cargo test --release --workspace --no-fail-fast 2>&1 | tee target/test-output.log
step "make install into a staging directory (files, systemd unit, config file)"
bash scripts/test-install.sh
if [ -x scripts/test-sdk.sh ]; then
  step "SDK tests (Python and TypeScript, against a real daemon)"
  bash scripts/test-sdk.sh
fi
if [ -x scripts/test-obs.sh ]; then
  step "MCP server (official MCP Python SDK) and /metrics (Prometheus text parser), against a real daemon"
  bash scripts/test-obs.sh
fi
