// Operations against a real daemon: a mutating call is found, read and waited for afterwards.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Client, NotFoundError, Operation, Volume, setDefaultClient } from "../dist/index.js";
import { Daemon, uniqueName } from "./daemon.mjs";

let daemon;

before(async () => {
  daemon = await Daemon.start();
  setDefaultClient(new Client({ socket: daemon.socket }));
});

after(() => daemon?.stop());

test("the operation of a call can be found, read and waited for", async () => {
  const name = uniqueName("ts-op");
  await Volume.create({ name, sizeMib: 32 });
  await Volume.delete(name);
  const ops = await Operation.list({ target: name });
  assert.deepEqual(
    ops.map((o) => [o.kind, o.state]),
    [
      ["volume.delete", "succeeded"],
      ["volume.create", "succeeded"],
    ],
  );
  const created = await Operation.get(ops[1].id);
  assert.equal(created.result.name, name);
  assert.deepEqual(created.resources.volumes, [name]);
  assert.ok((await Operation.wait(ops[0].id, { timeoutSeconds: 1 })).done);
  await assert.rejects(Operation.get("op-nosuchthing"), (e) => e instanceof NotFoundError && e.code === "operation_not_found");
});
