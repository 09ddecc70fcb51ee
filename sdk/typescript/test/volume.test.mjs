// Volumes against a real daemon: CRUD and errors, data that outlives its sandbox, snapshots without them.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import {
  Client,
  ConflictError,
  NotFoundError,
  Sandbox,
  Snapshot,
  Volume,
  VolumeAlreadyExistsError,
  VolumeInUseError,
  VolumeNotFoundError,
  errorFromCode,
  setDefaultClient,
} from "../dist/index.js";
import { Daemon, uniqueName } from "./daemon.mjs";

let daemon;

before(async () => {
  daemon = await Daemon.start();
  setDefaultClient(new Client({ socket: daemon.socket }));
});

after(() => daemon?.stop());

test("volume error codes map to their classes", () => {
  assert.ok(errorFromCode("volume_not_found", "") instanceof VolumeNotFoundError);
  assert.ok(errorFromCode("volume_not_found", "") instanceof NotFoundError);
  assert.ok(errorFromCode("volume_already_exists", "") instanceof VolumeAlreadyExistsError);
  assert.ok(errorFromCode("volume_in_use", "") instanceof VolumeInUseError);
  assert.ok(errorFromCode("volume_in_use", "") instanceof ConflictError);
});

test("create, get, list, delete; duplicate and missing volumes", async () => {
  const name = uniqueName("ts-vol");
  const vol = await Volume.create({ name, sizeMib: 64, labels: { lang: "ts" } });
  assert.deepEqual([vol.name, vol.id, vol.sizeBytes, vol.sizeMib, vol.inUse], [name, name, 64 * 2 ** 20, 64, false]);
  assert.deepEqual(vol.metadata, { lang: "ts" });
  assert.ok(vol.createdAt instanceof Date && vol.allocatedBytes >= 0);
  assert.equal((await Volume.get(name)).sizeBytes, 64 * 2 ** 20);
  assert.ok((await Volume.list()).some((v) => v.name === name));

  await assert.rejects(Volume.create({ name }), (e) => e instanceof VolumeAlreadyExistsError && e.status === 409 && e.message.includes(name));
  await assert.rejects(Sandbox.create({ volumes: [`${name}-missing:/data`] }), (e) => e instanceof VolumeNotFoundError && e.code === "volume_not_found");

  await vol.delete();
  await assert.rejects(Volume.get(name), (e) => e instanceof VolumeNotFoundError && e.status === 404);
  await assert.rejects(Volume.delete(name), VolumeNotFoundError);
});

test("a volume outlives its sandbox; a snapshot copy gets it only when asked", async () => {
  const name = uniqueName("ts-cache");
  const vol = await Volume.create({ name, sizeMib: 64 });
  const made = [];
  let snap;
  try {
    const first = await Sandbox.create({ memoryMib: 256, volumes: [`${name}:/data`] });
    made.push(first);
    assert.deepEqual(first.volumes, [{ volume: name, path: "/data", readOnly: false }]);
    await first.files.write("/data/result.txt", "computed once");
    // Deleting a sandbox stops its VM at once: flush the guest's page cache to the volume first.
    assert.ok((await first.run("sync")).ok);
    assert.deepEqual((await vol.refresh()).attachments, [{ sandboxId: first.id, sandboxName: first.name, path: "/data", readOnly: false }]);
    await assert.rejects(vol.delete(), (e) => e instanceof VolumeInUseError && e instanceof ConflictError && e.message.includes(first.name));

    snap = await first.snapshot({ name: uniqueName("ts-vsnap"), resumeSource: true });
    await first.delete();
    assert.equal((await vol.refresh()).inUse, false);

    // Snapshots hold no volumes: the copy gets this one because it is given again, here read-only elsewhere.
    const copy = await snap.restore(undefined, { volumes: [[vol, "/mnt/cache", true]] });
    made.push(copy);
    assert.deepEqual(copy.volumes, [{ volume: name, path: "/mnt/cache", readOnly: true }]);
    assert.equal(await copy.files.read("/mnt/cache/result.txt"), "computed once");
    assert.ok(!(await copy.files.exists("/data/result.txt")), "the source's mount must not come back with the snapshot");
    assert.ok(!(await copy.run("echo x > /mnt/cache/x")).ok, "a read-only volume must refuse writes");
  } finally {
    for (const sb of made) await sb.dispose();
    if (snap) await Snapshot.delete(snap.id);
    await Volume.delete(name);
  }
});
