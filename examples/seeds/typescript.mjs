// The TypeScript SDK seed page (../../shared/seeds/001_*) against kiln: `sandbox.snapshot()` and
// `resume()`, `snap.restore(sandboxName, opts)`, `saveNamed(name)` and the static `Snapshot.get/list/delete`,
// used as that page describes them. Only the import line differs (installed: `from "kiln-sdk"`); build the
// SDK first (`cd sdk/typescript && npm ci && npm run build`). The daemon comes from KILN_SOCKET (or the
// default socket). sdk/typescript/test/seeds.test.mjs runs it and checks what the page says happens.
import { Sandbox, Snapshot } from "../../sdk/typescript/dist/index.js";

const COUNTER = "(i=0; while true; do i=$((i+1)); echo $i > /tmp/n; sleep 0.1; done) >/dev/null 2>&1 &";

/** Runs the page's workflow; returns what it saw at each step. */
export async function main({ template = "tiny" } = {}) {
  const seen = {};
  const sandbox = await Sandbox.create({ template, memoryMib: 256 });
  const workers = [];
  let named = null;
  try {
    // Set up once: files on disk and a running process.
    await sandbox.run("echo installed > /root/setup-done");
    await sandbox.run(COUNTER);
    const bootId = (await sandbox.run("cat /proc/sys/kernel/random/boot_id")).stdout.trim();

    // snapshot(): captures memory, registers and filesystem; the sandbox is paused during capture.
    const snap = await sandbox.snapshot();
    seen.afterSnapshot = (await sandbox.refresh()).state;
    // resume(): the VM continues from exactly where it was paused.
    await sandbox.resume();
    seen.afterResume = (await sandbox.refresh()).state;
    seen.counterGoesOn = await counts(sandbox);

    // saveNamed(): persist it under a name that survives the original sandbox.
    await snap.saveNamed("after-pip-install");
    named = "after-pip-install";
    await sandbox.delete();

    // Snapshot.get(): load the named snapshot later to fork workers; restore(): each is a new sandbox
    // that starts where the original was (no boot), with its own copy-on-write filesystem.
    const loaded = await Snapshot.get("after-pip-install");
    seen.loadedId = loaded.id;
    seen.snapshotId = snap.id;
    workers.push(await loaded.restore("worker-1"));
    workers.push(await loaded.restore("worker-2", { memoryMib: 256, cpus: 1 }));
    seen.workers = [];
    for (const w of workers) {
      seen.workers.push({
        name: w.name,
        state: w.state,
        memoryMib: w.memoryMib,
        cpus: w.cpus,
        setup: (await w.run("cat /root/setup-done")).stdout.trim(),
        sameBoot: (await w.run("cat /proc/sys/kernel/random/boot_id")).stdout.trim() === bootId,
        counterGoesOn: await counts(w),
      });
    }
    // Each fork has its own filesystem.
    await workers[0].run("echo mine > /root/setup-done");
    seen.ownFilesystem = (await workers[1].run("cat /root/setup-done")).stdout.trim() === "installed";

    // Snapshot.list(): all saved snapshots, with their names.
    seen.listed = (await Snapshot.list()).filter((s) => s.names.includes("after-pip-install")).map((s) => s.id);

    // Snapshot.delete(): delete a named snapshot from disk.
    await Snapshot.delete("after-pip-install");
    named = null;
    seen.deletedGone = await Snapshot.get("after-pip-install").then(() => false, (e) => e.code === "snapshot_not_found");
    return seen;
  } finally {
    for (const w of workers) await w.delete().catch(() => {});
    await sandbox.delete().catch(() => {});
    if (named) await Snapshot.delete(named).catch(() => {});
  }
}

/** Whether the background counter started before the snapshot is still counting. */
async function counts(sb) {
  const read = async () => Number((await sb.run("cat /tmp/n")).stdout.trim());
  const before = await read();
  await new Promise((r) => setTimeout(r, 400));
  return (await read()) > before;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  console.log(JSON.stringify(await main(), null, 2));
}
