#!/usr/bin/env bash
# `make demo`: start the daemon on a private socket and show sandboxes working end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR="${KILN_DATA_DIR:-$PWD/.kiln-data}"
export KILN_DATA_DIR="$DATA_DIR"
export KILN_SOCKET="$DATA_DIR/demo.sock"
KILN="$PWD/target/release/kiln"
say() { printf '\n\033[1;36m$ %s\033[0m\n' "$*"; }
run() { say "$*"; "$@"; }

"$KILN" --data-dir "$DATA_DIR" serve --network user > "$DATA_DIR/demo-daemon.log" 2>&1 &
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
say "start a counter in the guest, then checkpoint it"
"$KILN" exec demo -- sh -c '(i=0; while true; do i=$((i+1)); echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.1; done) >/dev/null 2>&1 &'
sleep 1
say "kiln snapshot create demo --name demo-cp"
time "$KILN" snapshot create demo --name demo-cp
run "$KILN" snapshot list
say "kiln snapshot resume demo-cp --name demo-copy   (no boot: it goes on where the snapshot was)"
time "$KILN" snapshot resume demo-cp --name demo-copy
run "$KILN" exec demo-copy -- sh -c 'echo "counter in the copy: $(cat /tmp/n); hostname: $(hostname)"'
say "a resumed snapshot leaves a warm spare behind; the next resume only continues it"
for _ in $(seq 1 100); do
  "$KILN" --json snapshot get demo-cp | grep -q '"warm_spares": *[1-9]' && break
  sleep 0.1
done
time "$KILN" snapshot resume demo-cp --name demo-copy2
run "$KILN" exec demo-copy2 -- sh -c 'echo "counter in the second copy: $(cat /tmp/n); hostname: $(hostname)"'
say "kiln fork demo --count 2 --name demo-kid"
time "$KILN" fork demo --count 2 --name demo-kid
run "$KILN" exec demo-kid-1 -- sh -c 'echo "kid-1 machine-id $(cat /etc/machine-id)"'
run "$KILN" exec demo-kid-2 -- sh -c 'echo "kid-2 machine-id $(cat /etc/machine-id)"'
say "roll back: write a file, then restore the snapshot into the same sandbox"
"$KILN" exec demo -- sh -c 'echo oops > /root/mistake'
run "$KILN" snapshot restore demo-cp --resume
run "$KILN" exec demo -- sh -c 'ls /root/mistake 2>&1 || true'
say "hibernate and wake"
time "$KILN" stop demo
time "$KILN" start demo
run "$KILN" exec demo -- cat /tmp/n
run "$KILN" sandbox list
"$KILN" sandbox delete -y demo-copy demo-copy2 demo-kid-1 demo-kid-2 >/dev/null
"$KILN" snapshot delete -y demo-cp >/dev/null
if "$KILN" image list --json | grep -q '"base"'; then
  run "$KILN" sandbox create --name demo-py --template base
  run "$KILN" exec demo-py -- python3 -c 'import sys, platform; print("python", sys.version.split()[0], "on", platform.node())'
  run "$KILN" sandbox delete -y demo-py
fi
run "$KILN" sandbox delete -y demo
printf '\n\033[1;32mdemo finished\033[0m (daemon log: %s)\n' "$DATA_DIR/demo-daemon.log"
