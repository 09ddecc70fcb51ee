// Directory transfer as tar streams (a small ustar/pax writer and a reader that never writes outside
// its destination), batch-write bodies and directory-watch events.

import { constants as fsc } from "node:fs";
import { lstat, mkdir, open, readdir, readlink, chmod, symlink, unlink, utimes, lutimes, link } from "node:fs/promises";
import { join, resolve, sep } from "node:path";

import { errorFromCode } from "./errors.js";

/** What a directory upload unpacked. */
export interface UnpackResult {
  path: string;
  entries: number;
  bytes: number;
}

/** One change under a watched guest directory. */
export interface WatchEvent {
  /** `create`, `modify`, `delete`, `moved_from`, `moved_to` or `overflow` (events were lost: list again). */
  event: string;
  path: string;
  dir: boolean;
  /** Pairs a `moved_from` with its `moved_to`. */
  cookie?: number;
}

/** A file of a batch write: `content` as text, or bytes (sent as base64). */
export interface BatchFile {
  path: string;
  content: string | Uint8Array;
  /** e.g. `0o755` or `"0755"`. */
  mode?: number | string;
}

export function batchBody(files: BatchFile[]): unknown {
  return {
    files: files.map((f) => ({
      path: f.path,
      ...(typeof f.content === "string"
        ? { content: f.content }
        : { content: Buffer.from(f.content).toString("base64"), encoding: "base64" }),
      ...(f.mode === undefined ? {} : { mode: typeof f.mode === "number" ? f.mode.toString(8).padStart(4, "0") : f.mode }),
    })),
  };
}

const BLOCK = 512;

function octal(buf: Buffer, off: number, len: number, value: number): void {
  buf.write(value.toString(8).padStart(len - 1, "0") + "\0", off, len, "ascii");
}

function header(name: string, type: string, size: number, mode: number, mtime: number, linkname = ""): Buffer {
  const h = Buffer.alloc(BLOCK);
  h.write(name, 0, 100, "utf8");
  octal(h, 100, 8, mode & 0o7777);
  octal(h, 108, 8, 0);
  octal(h, 116, 8, 0);
  octal(h, 124, 12, size);
  octal(h, 136, 12, Math.max(0, Math.floor(mtime)));
  h.fill(" ", 148, 156);
  h.write(type, 156, 1, "ascii");
  h.write(linkname, 157, 100, "utf8");
  h.write("ustar\u000000", 257, 8, "ascii");
  let sum = 0;
  for (const b of h) sum += b;
  h.write(sum.toString(8).padStart(6, "0") + "\0 ", 148, 8, "ascii");
  return h;
}

function pad(size: number): Buffer {
  return Buffer.alloc((BLOCK - (size % BLOCK)) % BLOCK);
}

/** A pax record `LEN key=value\n`, whose length counts its own digits. */
function paxRecord(key: string, value: string): string {
  const body = ` ${key}=${value}\n`;
  let len = Buffer.byteLength(body) + 1;
  while (String(len).length + Buffer.byteLength(body) !== len) len = String(len).length + Buffer.byteLength(body);
  return `${len}${body}`;
}

function* entryHeaders(name: string, type: string, size: number, mode: number, mtime: number, linkname = ""): Generator<Buffer> {
  if (Buffer.byteLength(name) > 99 || Buffer.byteLength(linkname) > 99) {
    const pax = Buffer.from(paxRecord("path", name) + (linkname ? paxRecord("linkpath", linkname) : ""), "utf8");
    yield header("PaxHeader", "x", pax.length, 0o644, mtime);
    yield pax;
    yield pad(pax.length);
  }
  yield header(name.slice(0, 99), type, size, mode, mtime, linkname.slice(0, 99));
}

/** Streams a tar of `localDir`: entries relative to it, symlinks kept as symlinks, sockets skipped. */
export async function* packDir(localDir: string): AsyncGenerator<Uint8Array> {
  const stack: string[] = [""];
  while (stack.length) {
    const rel = stack.pop()!;
    const names = (await readdir(join(localDir, rel))).sort();
    const subdirs: string[] = [];
    for (const name of names) {
      const relChild = rel ? `${rel}/${name}` : name;
      const abs = join(localDir, relChild);
      const st = await lstat(abs);
      const mtime = st.mtimeMs / 1000;
      if (st.isSymbolicLink()) {
        yield* entryHeaders(relChild, "2", 0, st.mode, mtime, await readlink(abs));
      } else if (st.isDirectory()) {
        yield* entryHeaders(`${relChild}/`, "5", 0, st.mode, mtime);
        subdirs.push(relChild);
      } else if (st.isFile()) {
        yield* entryHeaders(relChild, "0", st.size, st.mode, mtime);
        const fh = await open(abs, "r");
        let sent = 0;
        try {
          const buf = Buffer.alloc(1 << 20);
          while (sent < st.size) {
            const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, st.size - sent), null);
            if (bytesRead === 0) break;
            sent += bytesRead;
            yield Buffer.from(buf.subarray(0, bytesRead));
          }
        } finally {
          await fh.close();
        }
        if (sent < st.size) yield Buffer.alloc(st.size - sent); // The file shrank while being packed.
        yield pad(st.size);
      }
    }
    stack.push(...subdirs.reverse());
  }
  yield Buffer.alloc(2 * BLOCK);
}

/** Pulls exact byte counts out of a chunk stream. */
class Reader {
  #it: AsyncIterator<Uint8Array>;
  #buf: Buffer = Buffer.alloc(0);
  constructor(src: AsyncIterable<Uint8Array>) {
    this.#it = src[Symbol.asyncIterator]();
  }
  async take(n: number): Promise<Buffer | undefined> {
    while (this.#buf.length < n) {
      const next = await this.#it.next();
      if (next.done) return undefined;
      this.#buf = Buffer.concat([this.#buf, next.value]);
    }
    const out = this.#buf.subarray(0, n);
    this.#buf = this.#buf.subarray(n);
    return out;
  }
  /** Up to `max` bytes (at least one), or undefined at the end. */
  async some(max: number): Promise<Buffer | undefined> {
    if (this.#buf.length === 0) {
      const next = await this.#it.next();
      if (next.done) return undefined;
      this.#buf = Buffer.from(next.value);
    }
    const out = this.#buf.subarray(0, max);
    this.#buf = this.#buf.subarray(out.length);
    return out;
  }
}

function str(h: Buffer, off: number, len: number): string {
  const end = h.indexOf(0, off);
  return h.toString("utf8", off, end >= 0 && end < off + len ? end : off + len);
}

function num(h: Buffer, off: number, len: number): number {
  const s = str(h, off, len).trim();
  return s ? parseInt(s, 8) : 0;
}

function escape(name: string): Error {
  return errorFromCode("path_escape", `tar entry ${JSON.stringify(name)} would land outside the destination`);
}

/** Unpacks a tar stream into `dest` (created if missing). The guest is not trusted: absolute names, `..`
 * and paths through symlinks are refused, and nothing is written through an existing symlink. */
export async function unpackTo(src: AsyncIterable<Uint8Array>, dest: string): Promise<number> {
  await mkdir(dest, { recursive: true });
  const root = resolve(dest);
  const r = new Reader(src);
  const dirs: Array<[string, number, number]> = [];
  let longName: string | undefined;
  let longLink: string | undefined;
  let count = 0;
  for (;;) {
    const h = await r.take(BLOCK);
    if (!h || h.every((b) => b === 0)) break;
    const type = String.fromCharCode(h[156] || 48);
    const size = num(h, 124, 12);
    const padded = size + ((BLOCK - (size % BLOCK)) % BLOCK);
    if (type === "x" || type === "L" || type === "K" || type === "g") {
      const data = (await r.take(padded))?.subarray(0, size).toString("utf8") ?? "";
      if (type === "L") longName = data.replace(/\0+$/, "");
      if (type === "K") longLink = data.replace(/\0+$/, "");
      if (type === "x") {
        for (const m of data.matchAll(/\d+ (\w+)=([^\n]*)\n/g)) {
          if (m[1] === "path") longName = m[2];
          if (m[1] === "linkpath") longLink = m[2];
        }
      }
      continue;
    }
    const prefix = str(h, 345, 155);
    let name = longName ?? (prefix ? `${prefix}/${str(h, 0, 100)}` : str(h, 0, 100));
    const linkname = longLink ?? str(h, 157, 100);
    longName = longLink = undefined;
    const mode = num(h, 100, 8) & 0o7777;
    const mtime = num(h, 136, 12);
    if (name.startsWith("/")) throw escape(name);
    const parts = name.split("/").filter((p) => p && p !== ".");
    if (parts.includes("..")) throw escape(name);
    name = parts.join("/");
    const target = join(root, ...parts);
    // Every existing ancestor must be a real directory, never a symlink.
    let at = root;
    for (const p of parts.slice(0, -1)) {
      at = join(at, p);
      const st = await lstat(at).catch(() => undefined);
      if (st?.isSymbolicLink()) throw escape(name);
      if (!st) await mkdir(at);
    }
    const existing = parts.length ? await lstat(target).catch(() => undefined) : undefined;
    if (type === "5") {
      if (existing?.isSymbolicLink()) throw escape(name);
      if (!existing) await mkdir(target);
      dirs.push([target, mode, mtime]);
    } else if (parts.length === 0) {
      throw errorFromCode("invalid_request", "a tar entry has no name");
    } else {
      if (existing?.isDirectory()) throw errorFromCode("guest_path_conflict", `${name}: a directory is in the way`);
      if (existing) await unlink(target);
      if (type === "0" || type === "\0" || type === "7") {
        const fh = await open(target, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600);
        try {
          let left = size;
          while (left > 0) {
            const chunk = await r.some(Math.min(left, 1 << 20));
            if (!chunk) throw errorFromCode("invalid_request", "the tar stream ended inside a file");
            await fh.write(chunk);
            left -= chunk.length;
          }
        } finally {
          await fh.close();
        }
        await chmod(target, mode);
        await utimes(target, mtime, mtime);
        await r.take(padded - size);
        count++;
        continue;
      } else if (type === "2") {
        await symlink(linkname, target);
        await lutimes(target, mtime, mtime).catch(() => undefined);
      } else if (type === "1") {
        const from = linkname.split("/").filter((p) => p && p !== ".");
        if (linkname.startsWith("/") || from.includes("..")) throw escape(linkname);
        await link(join(root, ...from), target);
      }
    }
    await r.take(padded);
    count++;
  }
  dirs.sort((a, b) => b[0].split(sep).length - a[0].split(sep).length);
  for (const [d, mode, mtime] of dirs) {
    await chmod(d, mode);
    await utimes(d, mtime, mtime);
  }
  return count;
}

/** Splits an NDJSON byte stream into parsed watch events. */
export async function* watchEvents(body: AsyncIterable<Uint8Array>): AsyncGenerator<WatchEvent> {
  const dec = new TextDecoder("utf-8");
  let pending = "";
  for await (const chunk of body) {
    pending += dec.decode(chunk, { stream: true });
    let nl: number;
    while ((nl = pending.indexOf("\n")) >= 0) {
      const line = pending.slice(0, nl).trim();
      pending = pending.slice(nl + 1);
      if (line) yield JSON.parse(line) as WatchEvent;
    }
  }
}

