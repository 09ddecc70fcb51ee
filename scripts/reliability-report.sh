#!/usr/bin/env bash
# Runs the fault tests (real VMs) and rewrites the results table in docs/reliability.md: per fault, the test,
# pass/fail, and what it counted (objects or operations attempted / survived / lost).
# Usage: scripts/reliability-report.sh [--from-log]   (KILN_TEST_IMAGES=... if the images are not in
# .kiln-data/images; --from-log rewrites the table from target/reliability.log without running the tests)
set -uo pipefail
cd "$(dirname "$0")/.."
log=target/reliability.log
mkdir -p target
if [ "${1:-}" = "--from-log" ]; then
  status=0  # only rewrite the table from the last run's log
else
  cargo test --release -p kiln-cli --test faults --test concurrent_clients --test operations --test integrity --test deadlines --test model -- --nocapture --test-threads=1 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
fi
python3 - "$log" docs/reliability.md <<'PY'
import re, sys, datetime
log, doc = sys.argv[1], sys.argv[2]
text = open(log, errors="replace").read()
# With --nocapture a test's own output sits between "test NAME ..." and its verdict (ok / FAILED), which
# ends that line or comes on a line of its own.
results, current = {}, None
for line in text.splitlines():
    m = re.match(r"^test (\w+) \.\.\. ?(.*)$", line)
    if m:
        current, line = m[1], m[2]
    verdict = re.search(r"(?:^|\s)(ok|FAILED|ignored)$", line.strip())
    if current and verdict and current not in results:
        results[current] = verdict[1]
        current = None
counts = {m[0]: (m[1], m[2]) for m in re.findall(r"RELIABILITY (\w+) (\S+) (.*)$", text, re.M)}
rows = [
    ("fork_with_a_child_killed_after_launch_leaves_nothing_behind",
     "QEMU of fork child 3 of 4 SIGKILLed right after launch (`KILN_FAULTS=qemu.kill_after_launch=kid-3`); fork over the limit; resume at the limit"),
    ("qemu_killed_under_a_running_sandbox_marks_it_failed_and_keeps_its_snapshots",
     "QEMU of a running sandbox SIGKILLed by the test"),
    ("upload_larger_than_the_free_guest_disk_is_refused_and_leaves_no_partial_file",
     "guest disk full during a 16 MB upload (disk filled to 4 MiB free)"),
    ("daemon_killed_in_the_middle_of_each_operation_loses_nothing",
     "daemon SIGKILLed while held (`KILN_FAULTS=hold.POINT=MS`) in create, resume, fork, snapshot (paused, written), stop, snapshot delete, sandbox delete, start; and during a 30 s exec"),
    ("fifty_clients_mixed_operations_no_deadlock_no_unexpected_errors",
     "50 concurrent API clients for 45 s (exec, files, lists, snapshots, creates and forks under `--max-sandboxes 3`)"),
    ("client_disconnects_never_cut_an_operation_short",
     "client closes its connection right after sending, ~30 ms in, and while the daemon holds near the end (`hold.POINT`), in snapshot full and diff, resume, fork ×3, stop, start, restore, sandbox delete"),
    ("daemon_killed_during_an_operation_reports_it_interrupted",
     "daemon SIGKILLed, then SIGTERMed, during a snapshot started with `Prefer: respond-async`; the operation after restart (interrupted; finished before exit)"),
    ("a_hibernated_state_is_retired_before_its_vcpus_run",
     "start: QEMU SIGKILLed after `cont` (daemon alive; daemon SIGKILLed too); daemon SIGKILLed after the state was retired, before `cont`"),
    ("a_stop_cut_short_after_its_save_keeps_the_save",
     "stop: daemon SIGKILLed after QEMU quit, and after the save was published with QEMU alive; exec during a stop; snapshot during a 20 s exec"),
    ("snapshot_names_are_reserved_and_temporary_paths_are_unique",
     "2 sandboxes snapshotted under one name at once; 6 unnamed snapshots at once"),
    ("diff_snapshots_are_pinned_to_their_base_by_content",
     "diff base changed: parent snapshot deleted and its name reused; template rebuilt"),
    ("restores_and_parent_deletes_take_their_locks",
     "2 restores of one snapshot at once; parent deleted while a diff is taken from it (`hold.snapshot.diff_based`)"),
    ("a_stopped_qemu_fails_each_operation_quickly_and_is_deleted_or_repaired",
     "QEMU SIGSTOPped under snapshot, stop, pause, exec and fork: each fails within seconds (`sandbox_unresponsive`), the lock is released, delete and `doctor --repair` end it"),
    ("random_lifecycle_walk_keeps_the_model_and_the_daemon_in_agreement",
     "model-based random walk (`KILN_MODEL_STEPS`, 150 in `make reliability`): create, exec, snapshots full/diff/disk, resume, fork, pause, stop/start, restore, deletes, a volume, clients hanging up mid-request, daemon SIGKILL; checked against the model after every step"),
    ("an_unverifiable_snapshot_found_at_start_up_is_quarantined",
     "damaged unrecorded snapshot directory found at start-up"),
]
def fmt(name):
    if name not in counts:
        return "–"
    unit, rest = counts[name]
    kv = dict(x.split("=", 1) for x in rest.split())
    extra = ", ".join(f"{k} {v}" for k, v in kv.items() if k not in ("attempted", "survived", "lost"))
    s = f"{unit}: {kv.get('attempted')} attempted / {kv.get('survived')} survived / {kv.get('lost')} lost"
    return s + (f" ({extra})" if extra else "")
lines = ["| fault | test | result | attempted / survived / lost |", "|---|---|---|---|"]
for name, fault in rows:
    res = {"ok": "pass", "FAILED": "**FAIL**", "ignored": "ignored"}.get(results.get(name), "not run")
    lines.append(f"| {fault} | `{name}` | {res} | {fmt(name)} |")
stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
table = "\n".join(lines) + f"\n\n_Generated by `scripts/reliability-report.sh` on {stamp}._\n"
body = open(doc).read()
start, end = "<!-- reliability-table:start -->", "<!-- reliability-table:end -->"
a, b = body.index(start) + len(start), body.index(end)
open(doc, "w").write(body[:a] + "\n" + table + body[b:])
print(table)
PY
exit "$status"
