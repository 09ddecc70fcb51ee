#!/usr/bin/env bash
# `make fuzz`: schemathesis generates requests from the daemon's own OpenAPI document and sends them to a
# real daemon (TCP on 127.0.0.1 with a token, fresh data dir). Fails on any 5xx, on a daemon crash, on
# `kiln doctor` finding inconsistencies, and on QEMU processes or files left behind after cleaning up.
# FUZZ_SECONDS (default 120) bounds the run. The daemon allows 2 sandboxes, so creates beyond that get the
# documented 429 capacity_exceeded instead of booting hundreds of VMs.
# Needs target/release/kiln (`make build`), the `tiny` image and python3; installs schemathesis into
# target/fuzz-venv only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }

KILN="${KILN_BIN:-$ROOT/target/release/kiln}"
IMAGES="${KILN_TEST_IMAGES:-${KILN_DATA_DIR:-$ROOT/.kiln-data}/images}"
FUZZ_SECONDS="${FUZZ_SECONDS:-120}"
SCHEMATHESIS_VERSION="4.32.5"
[ -x "$KILN" ] || die "$KILN is missing: run \`make build\`"
[ -f "$IMAGES/tiny/image.json" ] || die "image 'tiny' is not built in $IMAGES: run \`make image-tiny\`"
unset KILN_SOCKET KILN_URL KILN_TOKEN

step "schemathesis $SCHEMATHESIS_VERSION in target/fuzz-venv"
VENV=target/fuzz-venv
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV" || die "python3 -m venv failed: install python3-venv"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"

# Short path: unix socket paths are limited to 107 bytes.
DATA=$(mktemp -d /tmp/kfuzz.XXXXXX)
ln -s "$(cd "$IMAGES" && pwd)" "$DATA/images"
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
TOKEN=$("$KILN" --data-dir "$DATA" token rotate 2>/dev/null)
LOG="$ROOT/target/fuzz-daemon.log"
k() { "$KILN" --data-dir "$DATA" "$@"; }

DAEMON=""
cleanup() {
  if [ -n "$DAEMON" ] && kill -0 "$DAEMON" 2>/dev/null; then
    kill "$DAEMON"; wait "$DAEMON" 2>/dev/null || true
  fi
  # Last resort: VMs of this data dir only.
  for pid in $(pgrep -f "qemu-system.*$DATA/" || true); do kill -9 "$pid" 2>/dev/null || true; done
  rm -rf "$DATA"
}
trap cleanup EXIT

step "daemon on 127.0.0.1:$PORT, data in $DATA (log: $LOG)"
"$KILN" --data-dir "$DATA" serve --network user --listen "127.0.0.1:$PORT" --max-sandboxes 2 --rate-limit 0 \
  --boot-timeout 60 >"$LOG" 2>&1 &
DAEMON=$!
for _ in $(seq 100); do
  [ -S "$DATA/kiln.sock" ] && break
  kill -0 "$DAEMON" 2>/dev/null || { cat "$LOG"; die "the daemon exited at start-up"; }
  sleep 0.1
done

# The daemon boots the default template once at start to keep its snapshot (create is a resume). With
# --max-sandboxes 2 that boot holds the room a create needs until it is done, so wait for it.
for _ in $(seq 1200); do
  grep -q "template snapshot preparation finished" "$LOG" && break
  kill -0 "$DAEMON" 2>/dev/null || { cat "$LOG"; die "the daemon exited at start-up"; }
  sleep 0.1
done
grep -q "template snapshot preparation finished" "$LOG" || die "the daemon did not finish preparing its template snapshot in 120 s"

step "a sandbox for the fuzzer to work on"
k --json sandbox create --name fz --memory 128 >/dev/null || { tail -30 "$LOG"; die "could not create the target sandbox"; }

step "schemathesis for ${FUZZ_SECONDS}s: no 5xx allowed"
status=0
# From target/, so schemathesis' example database (.schemathesis/) stays out of the source tree.
# One worker: with two threads, CPython 3.11's ast.parse (which hypothesis calls to describe its filters)
# fails at random with "SystemError: AST constructor recursion depth mismatch" (CPython gh-106905), an
# error of the fuzzer, not of kiln, that failed the run.
# The tar upload is left out: schemathesis has no serializer for application/x-tar (tests/dirs.rs and the
# agent's unit tests send it hostile tars instead). The event stream is left out too: a valid request never ends
# (tests/events.rs covers its filters and refusals).
(cd target && "$ROOT/$VENV/bin/st" --config-file "$ROOT/scripts/fuzz-schemathesis.toml" run "http://127.0.0.1:$PORT/v1/openapi.json" \
  --url "http://127.0.0.1:$PORT" \
  --header "Authorization: Bearer $TOKEN" \
  --checks not_a_server_error \
  --max-time "$FUZZ_SECONDS" \
  --exclude-name 'PUT /v1/sandboxes/{id}/files/dir' \
  --exclude-name 'GET /v1/events' \
  --workers 1 \
  --request-timeout 120 \
  --phases examples,coverage,fuzzing \
  --suppress-health-check all \
  --report junit --report-dir fuzz-report \
  --no-color) || status=$?

step "daemon still alive and consistent"
kill -0 "$DAEMON" 2>/dev/null || { tail -50 "$LOG"; die "the daemon crashed during fuzzing"; }
grep -n "panicked" "$LOG" && { echo "the daemon panicked (see $LOG)"; status=1; }
if ! k doctor; then
  echo "kiln doctor found inconsistencies after fuzzing"; status=1
fi

step "delete everything the fuzzer made; nothing may be left"
for id in $(k --json sandbox list | "$PY" -c 'import json,sys; print(" ".join(s["id"] for s in json.load(sys.stdin)))'); do
  k sandbox delete -y "$id" >/dev/null || status=1
done
# Children first: a snapshot with diff snapshots on it cannot be deleted yet.
for _ in 1 2 3 4 5; do
  ids=$(k --json snapshot list | "$PY" -c 'import json,sys; print(" ".join(s["id"] for s in json.load(sys.stdin)))')
  [ -z "$ids" ] && break
  for id in $ids; do k snapshot delete -y "$id" >/dev/null 2>&1 || true; done
done
for name in $(k --json volume list | "$PY" -c 'import json,sys; print(" ".join(v["name"] for v in json.load(sys.stdin)))'); do
  k volume delete -y "$name" >/dev/null || status=1
done
kill "$DAEMON"; wait "$DAEMON" 2>/dev/null || true
DAEMON=""
sleep 1
leaked=$(pgrep -f "qemu-system.*$DATA/" || true)
[ -z "$leaked" ] || { echo "QEMU processes left behind: $leaked"; status=1; }
# Template snapshots (snapshots/template-*) are the daemon's boot snapshots of its images, kept on purpose
# for the next create (docs/snapshots.md, "Create is a resume"); anything else is debris.
debris=$(ls -A "$DATA/sandboxes" "$DATA/snapshots" "$DATA/volumes" 2>/dev/null | grep -v -e '^$' -e ':$' -e '^template-' || true)
[ -z "$debris" ] || { echo "files left behind in $DATA:"; ls -laR "$DATA/sandboxes" "$DATA/snapshots"; status=1; }
[ ! -e "$DATA/lost+found" ] || { echo "lost+found appeared"; status=1; }

if [ "$status" -eq 0 ]; then
  step "fuzzing passed: no server errors, no crash, nothing leaked"
else
  step "fuzzing FAILED (daemon log: $LOG, report: target/fuzz-report)"
fi
exit "$status"
