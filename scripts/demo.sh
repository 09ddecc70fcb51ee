#!/usr/bin/env bash
# `make demo`: start the daemon on a private socket and show sandboxes working end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR="${KILN_DATA_DIR:-$PWD/.kiln-data}"
export KILN_SOCKET="$DATA_DIR/demo.sock"
KILN="$PWD/target/release/kiln"
say() { printf '\n\033[1;36m$ %s\033[0m\n' "$*"; }
run() { say "$*"; "$@"; }

"$KILN" --data-dir "$DATA_DIR" serve > "$DATA_DIR/demo-daemon.log" 2>&1 &
DAEMON=$!
cleanup() {
  "$KILN" sandbox delete -y demo >/dev/null 2>&1 || true
  kill "$DAEMON" 2>/dev/null || true
  wait "$DAEMON" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 1 300); do [ -S "$KILN_SOCKET" ] && break; sleep 0.1; done
[ -S "$KILN_SOCKET" ] || { cat "$DATA_DIR/demo-daemon.log"; exit 1; }

run "$KILN" info
run "$KILN" image list
say "kiln sandbox create --name demo --template tiny"
time "$KILN" sandbox create --name demo --template tiny
run "$KILN" sandbox list
run "$KILN" exec demo -- uname -a
run "$KILN" exec demo -- sh -c 'echo "hello from $(hostname)"; cat /proc/meminfo | head -n 1'
say "echo 'some data' | kiln files write demo /root/note.txt"
echo 'some data' | "$KILN" files write demo /root/note.txt
run "$KILN" files read demo /root/note.txt
run "$KILN" files ls demo /root
if "$KILN" image list --json | grep -q '"base"'; then
  run "$KILN" sandbox create --name demo-py --template base
  run "$KILN" exec demo-py -- python3 -c 'import sys, platform; print("python", sys.version.split()[0], "on", platform.node())'
  run "$KILN" sandbox delete -y demo-py
fi
run "$KILN" sandbox delete -y demo
printf '\n\033[1;32mdemo finished\033[0m (daemon log: %s)\n' "$DATA_DIR/demo-daemon.log"
