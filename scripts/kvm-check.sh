#!/usr/bin/env bash
# kvm-check.sh: checks kiln on a host with working KVM, unattended, and prints a pass/fail table.
# See docs/kvm.md. Exit status 0 only when every check passed.
#
# Environment:
#   KILN                  kiln binary (default target/release/kiln; built with `make build` if missing)
#   KILN_TEST_IMAGES      guest images (default .kiln-data/images; `make images` builds them)
#   KVM_CHECK_TEMPLATE    template for the guest checks (default base, else tiny)
#   KVM_CHECK_UNCONFINED  1: run the daemon with --unconfined (containers without iptables/cgroups)
#   KVM_CHECK_SKIP_TESTS  1: skip the Rust integration tests   KVM_CHECK_SKIP_BENCH  1: skip make bench
#   KVM_CHECK_SKIP_VARIANTS 1: skip the device-variant measurements (disk aio/iothread, balloon free page
#                         reporting, virtio-serial against vhost-vsock; bench/bench.py --only disk,balloon,channel)
#   KVM_CHECK_MEM_MIB     RAM of the memory-heavy guest (default 4096)
#   KVM_CHECK_MEM_SECS    how long it runs (default 60)
#   KVM_CHECK_MAX_DISK_MB host disk writes allowed during it (default 512)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
KILN=${KILN:-$ROOT/target/release/kiln}
IMAGES=${KILN_TEST_IMAGES:-$ROOT/.kiln-data/images}
WORK=$(mktemp -d /tmp/kvmcheck.XXXXXX)
LOG=$WORK/kvm-check.log
DATA=$WORK/data
SOCK=$WORK/kiln.sock
DAEMON_PID=
declare -a ROWS=()

say() { echo "$*" | tee -a "$LOG"; }
# record NAME PASS|FAIL|SKIP DETAIL
record() {
  ROWS+=("$2|$1|$3")
  say "[$2] $1: $3"
}
k() { "$KILN" --data-dir "$DATA" --socket "$SOCK" "$@"; }
kx() { k exec "$1" -- sh -c "$2"; }
# A process's cgroup directory for CONTROLLER (v2: the unified one).
cg_dir() {
  local pid=$1 ctl=$2 line
  line=$(grep -E "^0::|[:,]$ctl[:,]" "/proc/$pid/cgroup" 2>/dev/null | head -1)
  [[ $line == 0::* ]] && { echo "/sys/fs/cgroup${line#0::}"; return; }
  local ctls=${line#*:}; ctls=${ctls%%:*}
  echo "/sys/fs/cgroup/$ctls${line##*:}"
}
throttled_us() { # v2 cpu.stat throttled_usec, v1 throttled_time (ns)
  local d
  d=$(cg_dir "$1" cpu)
  awk '/^throttled_usec/{print $2} /^throttled_time/{print int($2 / 1000)}' "$d/cpu.stat" 2>/dev/null | head -1
}
oom_kills() { # v2 memory.events, v1 memory.oom_control
  local d
  d=$(cg_dir "$1" memory)
  awk '/^oom_kill /{print $2}' "$d/memory.events" "$d/memory.oom_control" 2>/dev/null | head -1
}
delete_all() {
  local names
  names=$(k --json list 2>/dev/null | python3 -c 'import json,sys; print(" ".join(s["name"] for s in json.load(sys.stdin)))' 2>/dev/null)
  [[ -n $names ]] && k delete $names -y >/dev/null 2>&1
  true
}

cleanup() {
  if [[ -n $DAEMON_PID ]] && kill -0 "$DAEMON_PID" 2>/dev/null; then
    delete_all
    kill "$DAEMON_PID" 2>/dev/null
    wait "$DAEMON_PID" 2>/dev/null
  fi
  # VMs of this check only: their command lines name its data directory.
  for pid in $(pgrep -f -- "$DATA/" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
}
trap cleanup EXIT

table() {
  local fails=0
  echo
  printf '%-6s %-34s %s\n' RESULT CHECK DETAIL
  printf '%-6s %-34s %s\n' ------ ---------------------------------- ------
  for row in "${ROWS[@]}"; do
    IFS='|' read -r res name detail <<<"$row"
    printf '%-6s %-34s %s\n' "$res" "$name" "$detail"
    [[ $res == FAIL ]] && fails=$((fails + 1))
  done
  echo
  echo "log and daemon log: $LOG, $WORK/daemon.log"
  if ((fails > 0)); then
    echo "kvm-check: $fails check(s) FAILED"
    return 1
  fi
  echo "kvm-check: all checks passed"
}

finish() {
  table
  exit $?
}

# Skips every check that needs a daemon on KVM, giving why.
skip_rest() {
  for c in "QEMU uid/seccomp/cgroup/kvm fd" "guest clocksource kvm-clock" "clock after snapshot/resume/fork" \
    "clock after pause/hibernate" "sleep 1 lasts 1.00 +- 0.02 s" "fork x64 distinct identities" \
    "memory-heavy guest" "integration tests (KILN_ACCEL=kvm)" "make bench" "device variants"; do
    record "$c" SKIP "$1"
  done
  finish
}

# ---- host -------------------------------------------------------------------------------------------
say "== host"
say "date: $(date -u +%FT%TZ)"
say "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
say "cpu flags: $(grep -m1 -ow 'vmx\|svm' /proc/cpuinfo | head -1 || true) $(grep -m1 -o 'constant_tsc\|tsc_known_freq' /proc/cpuinfo | sort -u | xargs)"
say "address sizes: $(grep -m1 'address sizes' /proc/cpuinfo | cut -d: -f2- | xargs)"
say "kernel: $(uname -srvm)"
say "qemu: $(qemu-system-x86_64 --version 2>/dev/null | head -1)"
if [[ -f /.dockerenv || -f /run/.containerenv ]] || grep -qE 'docker|containerd|podman|lxc' /proc/1/cgroup 2>/dev/null; then
  say "container: yes"
fi
for m in kvm kvm_intel kvm_amd kvm_pvm; do
  [[ -d /sys/module/$m ]] || continue
  params=""
  for p in /sys/module/$m/parameters/*; do
    [[ -r $p ]] && params+=" $(basename "$p")=$(cat "$p" 2>/dev/null)"
  done
  say "module $m:$params"
done
say "/dev/kvm: $(stat -c '%A %U:%G (%u:%g) %t:%T' /dev/kvm 2>&1)"

if [[ ! -x $KILN ]]; then
  say "== building kiln (make build)"
  make build >>"$LOG" 2>&1 || { record "build" FAIL "make build failed (see $LOG)"; skip_rest "no kiln binary"; }
fi

# What a VM meets under KVM here: `kiln serve --accel kvm` runs its probe VM (as a VM uid, microvm, kiln's
# -cpu, the daemon's /dev/kvm descriptor) and refuses to start if it fails.
if [[ -e /dev/kvm ]]; then
  mkdir -p "$WORK/probe"
  timeout 60 "$KILN" --data-dir "$WORK/probe" --socket "$WORK/probe.sock" serve --accel kvm --network user \
    >"$WORK/probe.log" 2>&1 &
  ppid=$!
  for _ in $(seq 1 300); do
    grep -q "API listening" "$WORK/probe.log" && break
    kill -0 "$ppid" 2>/dev/null || break
    sleep 0.1
  done
  if grep -q "API listening" "$WORK/probe.log"; then
    record "probe VM runs under KVM" PASS "kiln serve --accel kvm started"
  else
    record "probe VM runs under KVM" FAIL "$(grep -o 'KVM cannot run VMs here.*' "$WORK/probe.log" | head -1 | cut -c1-400)"
  fi
  kill "$ppid" 2>/dev/null
  wait "$ppid" 2>/dev/null
fi

hw=""
for m in kvm_intel kvm_amd; do [[ -d /sys/module/$m ]] && hw=$m; done
if [[ ! -e /dev/kvm ]]; then
  record "host has hardware KVM" FAIL "no /dev/kvm (load kvm_intel/kvm_amd; containers need --device /dev/kvm)"
  skip_rest "no KVM on this host"
elif [[ -z $hw ]]; then
  why="/dev/kvm exists but neither kvm_intel nor kvm_amd is loaded"
  [[ -d /sys/module/kvm_pvm ]] && why+=" (kvm_pvm: a paravirtual nested KVM that cannot run ordinary Linux guests; kiln uses TCG here)"
  record "host has hardware KVM" FAIL "$why"
  skip_rest "no hardware KVM"
else
  record "host has hardware KVM" PASS "$hw loaded, /dev/kvm present"
fi

# ---- daemon -----------------------------------------------------------------------------------------
TEMPLATE=${KVM_CHECK_TEMPLATE:-base}
[[ -f $IMAGES/$TEMPLATE/image.json ]] || TEMPLATE=tiny
if [[ ! -f $IMAGES/$TEMPLATE/image.json ]]; then
  record "guest images" FAIL "none in $IMAGES (make images, or set KILN_TEST_IMAGES)"
  skip_rest "no guest images"
fi
mkdir -p "$DATA"
ln -s "$(readlink -f "$IMAGES")" "$DATA/images"
serve_args=(serve)
[[ ${KVM_CHECK_UNCONFINED:-0} == 1 ]] && serve_args+=(--unconfined)
# Automatic accelerator selection: no --accel, no KILN_ACCEL.
env -u KILN_ACCEL KILN_WARM_SPARES=0 "$KILN" --data-dir "$DATA" --socket "$SOCK" "${serve_args[@]}" \
  >"$WORK/daemon.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 1 600); do
  [[ -S $SOCK ]] && k info >/dev/null 2>&1 && break
  kill -0 "$DAEMON_PID" 2>/dev/null || break
  sleep 0.1
done
if ! k info >/dev/null 2>&1; then
  record "daemon starts (auto accel)" FAIL "$(tail -3 "$WORK/daemon.log" | tr '\n' ' ' | cut -c1-300)"
  skip_rest "the daemon did not start"
fi
accel=$(k --json info | python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["accel"], "-", v["accel_reason"])')
if [[ $accel == kvm* ]]; then
  record "daemon chose KVM (auto)" PASS "$accel"
else
  record "daemon chose KVM (auto)" FAIL "$accel"
  skip_rest "the daemon is not on KVM"
fi

# ---- one VM: confinement and clock source --------------------------------------------------------------
if ! k create -t "$TEMPLATE" -n c1 >>"$LOG" 2>&1; then
  record "create a sandbox" FAIL "see $LOG"
  skip_rest "no sandbox"
fi
bad=""
n=0
for pid in $(pgrep -f -- "$DATA/sandboxes/"); do
  [[ $(readlink "/proc/$pid/exe") == *qemu* ]] || continue
  n=$((n + 1))
  uid=$(awk '/^Uid:/{print $2}' "/proc/$pid/status")
  sec=$(awk '/^Seccomp:/{print $2}' "/proc/$pid/status")
  cg=$(cg_dir "$pid" memory)
  kvmfd=$(for f in /proc/$pid/fd/*; do readlink "$f"; done 2>/dev/null | grep -c '^/dev/kvm$')
  say "qemu $pid: uid=$uid seccomp=$sec cgroup=$cg kvm-fds=$kvmfd"
  [[ $uid == 0 && ${KVM_CHECK_UNCONFINED:-0} != 1 ]] && bad+=" pid $pid runs as root;"
  [[ $sec == 2 ]] || bad+=" pid $pid seccomp=$sec;"
  [[ $cg == *kiln* || ${KVM_CHECK_UNCONFINED:-0} == 1 ]] || bad+=" pid $pid cgroup $cg;"
  ((kvmfd >= 1)) || bad+=" pid $pid has no /dev/kvm descriptor;"
done
if ((n == 0)); then
  record "QEMU uid/seccomp/cgroup/kvm fd" FAIL "no QEMU process found"
elif [[ -n $bad ]]; then
  record "QEMU uid/seccomp/cgroup/kvm fd" FAIL "$bad"
else
  record "QEMU uid/seccomp/cgroup/kvm fd" PASS "$n QEMU: unprivileged uid, seccomp filter, kiln cgroup, /dev/kvm fd"
fi
cs=$(kx c1 'cat /sys/devices/system/clocksource/clocksource0/current_clocksource' 2>&1)
[[ $cs == kvm-clock ]] && record "guest clocksource kvm-clock" PASS "$cs" || record "guest clocksource kvm-clock" FAIL "$cs"

# ---- clocks after each operation ----------------------------------------------------------------------
# Guest wall clock minus the host's at the midpoint of the exec, in ms.
offset_ms() {
  local t0 g t1
  t0=$(date +%s%N)
  g=$(kx "$1" 'date +%s%N' 2>/dev/null)
  t1=$(date +%s%N)
  [[ $g =~ ^[0-9]+$ ]] || { echo "unreadable:$g"; return; }
  echo $(((g - (t0 + t1) / 2) / 1000000))
}
clock_check() { # NAME SANDBOX...
  local name=$1 worst=0 detail="" o a
  shift
  for sb in "$@"; do
    o=$(offset_ms "$sb")
    detail+="$sb ${o}ms "
    [[ $o =~ ^-?[0-9]+$ ]] || { worst=99999; continue; }
    a=${o#-}
    ((a > worst)) && worst=$a
  done
  ((worst <= 50)) && record "$name" PASS "$detail" || record "$name" FAIL "$detail(limit 50 ms)"
}
k snapshot create c1 --name s1 >>"$LOG" 2>&1 || record "snapshot create" FAIL "see $LOG"
k snapshot resume s1 --name r1 >>"$LOG" 2>&1 || record "snapshot resume" FAIL "see $LOG"
k fork c1 -n 1 --name fk >>"$LOG" 2>&1 || record "fork" FAIL "see $LOG"
sleep 2
clock_check "clock after snapshot/resume/fork" c1 r1 fk-1
k pause r1 >>"$LOG" 2>&1 && sleep 3 && k resume r1 >>"$LOG" 2>&1
k stop fk-1 >>"$LOG" 2>&1 && sleep 3 && k start fk-1 >>"$LOG" 2>&1
clock_check "clock after pause/hibernate" r1 fk-1

slept=$(kx c1 't0=$(date +%s%N); sleep 1; t1=$(date +%s%N); echo $(((t1 - t0) / 1000000))' 2>&1)
if [[ $slept =~ ^[0-9]+$ ]] && ((slept >= 980 && slept <= 1020)); then
  record "sleep 1 lasts 1.00 +- 0.02 s" PASS "${slept} ms"
else
  record "sleep 1 lasts 1.00 +- 0.02 s" FAIL "${slept} ms"
fi
k delete r1 fk-1 -y >>"$LOG" 2>&1

# ---- fork x64 -----------------------------------------------------------------------------------------
if k fork c1 -n 64 --name f >>"$LOG" 2>&1; then
  : >"$WORK/ids"
  for i in $(seq 1 64); do
    kx "f-$i" 'echo "$(cat /etc/machine-id) $(hostname) $(head -c 16 /dev/urandom | od -An -tx1 | tr -d " \n")"' \
      >>"$WORK/ids" 2>&1
  done
  mids=$(awk '{print $1}' "$WORK/ids" | sort -u | wc -l)
  hosts=$(awk '{print $2}' "$WORK/ids" | sort -u | wc -l)
  rnd=$(awk '{print $3}' "$WORK/ids" | sort -u | wc -l)
  if ((mids == 64 && hosts == 64 && rnd == 64)); then
    record "fork x64 distinct identities" PASS "64 machine-ids, hostnames, RNG outputs"
  else
    record "fork x64 distinct identities" FAIL "distinct machine-ids $mids, hostnames $hosts, RNG $rnd of 64"
  fi
  k delete $(seq -f 'f-%g' 1 64) -y >>"$LOG" 2>&1
else
  record "fork x64 distinct identities" FAIL "fork -n 64 failed (see $LOG)"
fi

# ---- memory-heavy guest -----------------------------------------------------------------------------
MEM=${KVM_CHECK_MEM_MIB:-4096}
SECS=${KVM_CHECK_MEM_SECS:-60}
dev=$(df --output=source "$DATA" | tail -1)
devname=$(basename "$(readlink -f "$dev")")
written_sectors() { awk -v d="$devname" '$3 == d {print $10}' /proc/diskstats; }
if k create -t "$TEMPLATE" -n mem --memory "$MEM" >>"$LOG" 2>&1; then
  pid=$(pgrep -f -- "$DATA/sandboxes/" | while read -r p; do
    grep -qa -- "kiln-" "/proc/$p/cmdline" && grep -qa "size=${MEM}M" "/proc/$p/cmdline" && echo "$p"
  done | head -1)
  w0=$(written_sectors)
  thr0=$(throttled_us "$pid")
  fill=$((MEM * 3 / 4))
  kx mem "mkdir -p /mnt/ram && mount -t tmpfs -o size=${fill}m tmpfs /mnt/ram && end=\$((\$(date +%s) + $SECS)); \
    while [ \$(date +%s) -lt \$end ]; do dd if=/dev/zero of=/mnt/ram/f bs=1M count=$((fill - 64)) 2>/dev/null; rm -f /mnt/ram/f; done; echo done" \
    >>"$LOG" 2>&1
  alive=$(k --json inspect mem 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])' 2>/dev/null)
  w1=$(written_sectors)
  thr1=$(throttled_us "$pid")
  ooms=$(oom_kills "$pid")
  mb=$((((${w1:-0} - ${w0:-0}) * 512) / 1048576))
  thr_ms=$(((${thr1:-0} - ${thr0:-0}) / 1000))
  detail="${MEM} MiB guest ${SECS}s: host wrote ${mb} MB to $devname, oom_kill=${ooms:-?}, throttled ${thr_ms} ms, state ${alive:-?}"
  if [[ $alive == running && ${ooms:-0} == 0 ]] && ((mb <= ${KVM_CHECK_MAX_DISK_MB:-512})) && ((thr_ms <= SECS * 100)); then
    record "memory-heavy guest" PASS "$detail"
  else
    record "memory-heavy guest" FAIL "$detail (limits: running, no OOM, <= ${KVM_CHECK_MAX_DISK_MB:-512} MB written, <= 10% throttled)"
  fi
  k delete mem -y >>"$LOG" 2>&1
else
  record "memory-heavy guest" FAIL "could not create a ${MEM} MiB sandbox (see $LOG)"
fi
delete_all

# ---- the Rust integration tests and the benchmarks, under KVM ---------------------------------------------
if [[ ${KVM_CHECK_SKIP_TESTS:-0} == 1 ]]; then
  record "integration tests (KILN_ACCEL=kvm)" SKIP "KVM_CHECK_SKIP_TESTS=1"
elif ! command -v cargo >/dev/null; then
  record "integration tests (KILN_ACCEL=kvm)" FAIL "cargo not found"
elif KILN_ACCEL=kvm KILN_TEST_IMAGES=$IMAGES cargo test --release -p kiln-cli --tests >"$WORK/tests.log" 2>&1; then
  record "integration tests (KILN_ACCEL=kvm)" PASS "$(grep -c '^test result: ok' "$WORK/tests.log") test binaries ok"
else
  record "integration tests (KILN_ACCEL=kvm)" FAIL "$(grep -E '^test .* FAILED|^    [a-z_]+$' "$WORK/tests.log" | head -5 | xargs) (see $WORK/tests.log)"
fi
if [[ ${KVM_CHECK_SKIP_BENCH:-0} == 1 ]]; then
  record "make bench" SKIP "KVM_CHECK_SKIP_BENCH=1"
elif KILN_ACCEL=kvm make bench >"$WORK/bench.log" 2>&1; then
  record "make bench" PASS "results in bench/results (log $WORK/bench.log)"
else
  record "make bench" FAIL "see $WORK/bench.log"
fi
# ---- device variants (issue 13 item 8): the same comparison as under TCG in docs/kvm.md ------------------
if [[ ${KVM_CHECK_SKIP_VARIANTS:-0} == 1 ]]; then
  record "device variants" SKIP "KVM_CHECK_SKIP_VARIANTS=1"
else
  # vhost-vsock is compared with virtio-serial only where the host has it.
  [[ -e /dev/vhost-vsock ]] || modprobe vhost_vsock >>"$LOG" 2>&1 || true
  say "/dev/vhost-vsock: $(stat -c '%A %U:%G' /dev/vhost-vsock 2>&1)"
  out=$ROOT/bench/results/variants-kvm-$(hostname -s 2>/dev/null || echo host)-$(date -u +%Y%m%d).json
  if KILN_ACCEL=kvm python3 bench/bench.py --runs 3 --only disk,balloon,channel --images "$IMAGES" \
    --out "$out" >"$WORK/variants.log" 2>&1; then
    record "device variants" PASS "measured, not judged: $out (table in $WORK/variants.log)"
  else
    record "device variants" FAIL "see $WORK/variants.log"
  fi
fi
finish
