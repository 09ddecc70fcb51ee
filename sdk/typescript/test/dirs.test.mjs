// Directories as tar streams, batch writes, listings with kinds and a directory watch, against a real daemon.
import assert from "node:assert/strict";
import { lstatSync, mkdirSync, mkdtempSync, readFileSync, readlinkSync, rmSync, symlinkSync, utimesSync, writeFileSync, chmodSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { Client, PathEscapeError, Sandbox, setDefaultClient } from "../dist/index.js";
import { Daemon } from "./daemon.mjs";

let daemon;
let sb;
const local = mkdtempSync(join(tmpdir(), "kiln-ts-dirs-"));

before(async () => {
  daemon = await Daemon.start();
  setDefaultClient(new Client({ socket: daemon.socket }));
  sb = await Sandbox.create({ template: "tiny", memoryMib: 256, cpus: 1 });
});

after(async () => {
  await sb?.dispose();
  daemon?.stop();
  rmSync(local, { recursive: true, force: true });
});

test("a directory goes in and comes back with modes, symlinks, empty dirs and mtimes", async () => {
  const src = join(local, "src");
  mkdirSync(join(src, "a/b"), { recursive: true });
  mkdirSync(join(src, "empty"));
  writeFileSync(join(src, "a/run.sh"), "#!/bin/sh\necho ran\n");
  chmodSync(join(src, "a/run.sh"), 0o750);
  utimesSync(join(src, "a/run.sh"), 1_600_000_000, 1_600_000_000);
  writeFileSync(join(src, "a/b/" + "n".repeat(120)), "long name");
  symlinkSync("a/run.sh", join(src, "link"));

  const r = await sb.files.uploadDir(src, "/root/tstree");
  assert.equal(r.entries, 6);
  assert.equal((await sb.commands.run("/root/tstree/link")).stdout, "ran\n");
  const kinds = Object.fromEntries((await sb.files.list("/root/tstree")).map((e) => [e.name, e.kind]));
  assert.deepEqual(kinds, { a: "dir", empty: "dir", link: "symlink" });

  const back = join(local, "back");
  assert.equal(await sb.files.downloadDir("/root/tstree", back), 6);
  assert.equal(readlinkSync(join(back, "link")), "a/run.sh");
  const st = lstatSync(join(back, "a/run.sh"));
  assert.equal(st.mode & 0o7777, 0o750);
  assert.equal(Math.floor(st.mtimeMs / 1000), 1_600_000_000);
  assert.equal(readFileSync(join(back, "a/b/" + "n".repeat(120)), "utf8"), "long name");
  assert.ok(lstatSync(join(back, "empty")).isDirectory());
});

test("an upload through a symlink planted in the guest is refused", async () => {
  await sb.commands.run("mkdir -p /root/tsesc && ln -sfn /etc /root/tsesc/evil");
  const evil = join(local, "evil");
  mkdirSync(join(evil, "evil"), { recursive: true });
  writeFileSync(join(evil, "evil/pwned"), "no");
  await assert.rejects(sb.files.uploadDir(evil, "/root/tsesc"), PathEscapeError);
  assert.equal(await sb.files.exists("/etc/pwned"), false);
});

test("batch writes and a watch", async () => {
  const w = await sb.files.writeFiles([
    { path: "/root/tsb/a.txt", content: "a" },
    { path: "/root/tsb/b.bin", content: new Uint8Array([0, 255]), mode: 0o600 },
  ]);
  assert.deepEqual(w.map((x) => x.bytes), [1, 2]);
  assert.equal((await sb.files.stat("/root/tsb/b.bin")).mode, 0o600);

  const events = await sb.files.watch("/root/tsb");
  const done = sb.commands.run("cd /root/tsb && echo x > c && rm c");
  const seen = [];
  for await (const ev of events) {
    seen.push(`${ev.event} ${ev.path}`);
    if (ev.event === "delete") break;
  }
  await done;
  assert.equal(seen[0], "create /root/tsb/c");
  assert.equal(seen.at(-1), "delete /root/tsb/c");
});
