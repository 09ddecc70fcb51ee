#!/usr/bin/env bash
# `make bench`: build, then run the benchmarks against real VMs.
set -euo pipefail
cd "$(dirname "$0")/.."
# The plots need matplotlib: installed from PyPI into a venv of the bench's own (not system-wide).
venv=bench/.venv
if ! "$venv/bin/python" -c "import matplotlib" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet matplotlib
fi
"$venv/bin/python" bench/bench.py "$@"
