#!/usr/bin/env bash
# `make bench`: build, then run the benchmarks against real VMs.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 bench/bench.py "$@"
