import { createReadStream, createWriteStream } from "node:fs";
import { stat as fsStat } from "node:fs/promises";
import { posix } from "node:path";
import { pipeline } from "node:stream/promises";

import { Client, type WithClient, defaultClient, sandboxPath, snapshotPath } from "./client.js";
import { GuestPathNotFoundError, SandboxNotFoundError, errorFromCode } from "./errors.js";
import { type BatchFile, type UnpackResult, type WatchEvent, batchBody, packDir, unpackTo, watchEvents } from "./dirs.js";
import { Processes } from "./process.js";
import { Snapshot } from "./snapshot.js";
import { mountsFromRecord, volumesJson } from "./volume.js";
import { lifetimeFromRecord, lifetimeJson } from "./types.js";
import type {
  CheckpointPolicy,
  CommandResult,
  DirEntry,
  FileInfo,
  Lifetime,
  LifetimeOptions,
  PortMapping,
  PortSpec,
  SandboxRecord,
  SandboxState,
  SnapshotRecord,
  SnapshotType,
  VolumeMount,
  VolumeSpec,
  WriteResult,
} from "./types.js";

export interface CreateSandboxOptions extends WithClient, LifetimeOptions {
  /** Guest image to boot (default `tiny`; ignored with `snapshot`). */
  template?: string;
  /** Unique name (default: the id). */
  name?: string;
  memoryMib?: number;
  /**
   * Room for copies restored from its memory snapshots to have more memory, up to this many MiB
   * (default: `memoryMib` × the daemon's `--memory-headroom`, 2; `memoryMib` for none).
   */
  maxMemoryMib?: number;
  /** Boot cold instead of resuming the template's snapshot (the answer's `boot` says how it started). */
  boot?: boolean;
  /** Take a checkpoint every this many seconds (see `checkpoints()` and `rewind()`). */
  checkpointEvery?: number;
  /** Checkpoints kept (default 10). */
  checkpointKeep?: number;
  cpus?: number;
  diskSizeGib?: number;
  /** Environment variables for every command run in it. */
  env?: Record<string, string>;
  /** Labels, for `Sandbox.list({ metadata })`. */
  metadata?: Record<string, string>;
  /** Guest ports to publish on 127.0.0.1: `8080` (a free host port is picked; see `getHost`) or `{ guest, host }`. */
  ports?: PortSpec[];
  /** Make it from this snapshot instead of booting (like `snapshot.restore()`). */
  snapshot?: string;
  /**
   * Volumes to attach (at most 4): `"name:/path"`, `"name:/path:ro"`, `[name, path, readOnly?]` or
   * `{ volume, path, readOnly? }`. A read-write volume belongs to one sandbox at a time; read-only ones may be
   * shared. With `snapshot`, the new sandbox gets exactly these (snapshots hold no volumes).
   */
  volumes?: readonly VolumeSpec[];
}

export interface RunOptions {
  env?: Record<string, string>;
  cwd?: string;
  /** Kill the command after this long; the result then has `timedOut: true`. */
  timeoutMs?: number;
  /** Text or bytes fed to standard input. */
  stdin?: string | Uint8Array;
  /** Run as this guest user (name or uid) instead of root. */
  user?: string | number;
  /** Called with each chunk of standard output as it arrives (the output is also in the result). */
  onStdout?: (data: string) => void;
  onStderr?: (data: string) => void;
}

export interface SnapshotOptions {
  /** The snapshot's id (default `snap-<sandbox>-<unix time>`); must be unused. */
  name?: string;
  /** `full` (default), `diff` (only changes since the origin) or `disk` (no memory; restores by cold boot). */
  type?: SnapshotType;
  /**
   * `true` continues the sandbox right after the capture. By default it stays paused, as the SDK's
   * reference describes `snapshot()`: call {@link Sandbox.resume} to continue it.
   */
  resumeSource?: boolean;
  metadata?: Record<string, string>;
  /** Seconds until the snapshot expires; it is then deleted once nothing depends on it. */
  ttl?: number;
}

/** Fork options; lifetime fields apply to every child (children inherit none from the source). */
export interface ForkOptions extends LifetimeOptions {
  /** How many children (default 1). */
  count?: number;
  /** Children are named `NAME-1`, `NAME-2`, ... (default: the source's name plus `-fork-XXXX`). */
  name?: string;
  metadata?: Record<string, string>;
}

// How much longer than a command's own timeout to wait for the daemon before giving up.
const EXEC_GRACE_MS = 30_000;

function labelQuery(metadata: Record<string, string> | undefined): [string, string][] {
  return Object.entries(metadata ?? {}).map(([k, v]) => ["label", `${k}=${v}`]);
}

/** Runs processes in a sandbox (`sandbox.commands`). */
export class Commands {
  readonly #sandbox: Sandbox;

  constructor(sandbox: Sandbox) {
    this.#sandbox = sandbox;
  }

  /**
   * Runs a command and waits for it. A string is a shell command line (`/bin/sh -c`); an array is an
   * argv run directly. With `onStdout`/`onStderr` the output is streamed as it arrives.
   */
  async run(cmd: string | string[], options: RunOptions = {}): Promise<CommandResult> {
    const stream = options.onStdout !== undefined || options.onStderr !== undefined;
    const body: Record<string, unknown> = typeof cmd === "string" ? { cmd } : { argv: cmd };
    if (options.env) body.env = options.env;
    if (options.cwd !== undefined) body.cwd = options.cwd;
    if (options.user !== undefined) body.user = String(options.user);
    if (options.timeoutMs !== undefined) body.timeout_ms = Math.max(1, Math.round(options.timeoutMs));
    if (typeof options.stdin === "string") body.stdin = options.stdin;
    else if (options.stdin !== undefined) body.stdin_b64 = Buffer.from(options.stdin).toString("base64");
    if (stream) body.stream = true;

    const client = this.#sandbox.client;
    const res = await client.request("POST", sandboxPath(this.#sandbox.id, "/exec"), {
      json: body,
      timeoutMs: options.timeoutMs === undefined ? null : options.timeoutMs + EXEC_GRACE_MS,
    });
    if (!stream) return toResult(await res.json<ExecJson>());
    return readExecStream(res.body, options);
  }
}

interface ExecJson {
  exit_code?: number | null;
  signal?: number | null;
  timed_out?: boolean;
  duration_ms?: number;
  stdout?: string;
  stderr?: string;
  truncated?: boolean;
}

function toResult(d: ExecJson, stdout = d.stdout ?? "", stderr = d.stderr ?? ""): CommandResult {
  const exitCode = d.exit_code ?? null;
  const timedOut = d.timed_out ?? false;
  return {
    stdout,
    stderr,
    exitCode,
    signal: d.signal ?? null,
    timedOut,
    durationMs: d.duration_ms ?? 0,
    truncated: d.truncated ?? false,
    ok: exitCode === 0 && !timedOut,
  };
}

/** Decodes NDJSON exec events. Output is decoded incrementally per stream, so a UTF-8 character split
 * across chunks (sent as `data_b64`) still comes out whole. */
async function readExecStream(body: AsyncIterable<Uint8Array>, options: RunOptions): Promise<CommandResult> {
  const out = { text: "", decoder: new TextDecoder("utf-8"), cb: options.onStdout };
  const err = { text: "", decoder: new TextDecoder("utf-8"), cb: options.onStderr };
  const lines = new TextDecoder("utf-8");
  let pending = "";
  for await (const chunk of body) {
    pending += lines.decode(chunk, { stream: true });
    let nl: number;
    while ((nl = pending.indexOf("\n")) >= 0) {
      const line = pending.slice(0, nl).trim();
      pending = pending.slice(nl + 1);
      if (!line) continue;
      const ev = JSON.parse(line) as ExecJson & { type: string; data?: string | null; data_b64?: string | null; code?: string; message?: string };
      if (ev.type === "stdout" || ev.type === "stderr") {
        const s = ev.type === "stdout" ? out : err;
        const raw = ev.data != null ? Buffer.from(ev.data, "utf8") : Buffer.from(ev.data_b64 ?? "", "base64");
        const text = s.decoder.decode(raw, { stream: true });
        if (text) {
          s.text += text;
          s.cb?.(text);
        }
      } else if (ev.type === "exit") {
        for (const s of [out, err]) {
          const tail = s.decoder.decode();
          if (tail) {
            s.text += tail;
            s.cb?.(tail);
          }
        }
        return toResult(ev, out.text, err.text);
      } else if (ev.type === "error") {
        throw errorFromCode(ev.code ?? "internal", ev.message ?? "the command failed");
      }
    }
  }
  throw errorFromCode("agent_unavailable", "the exec stream ended without an exit event");
}

/** Reads and writes files in a sandbox (`sandbox.files`). Guest paths must be absolute. */
export class Files {
  readonly #sandbox: Sandbox;

  constructor(sandbox: Sandbox) {
    this.#sandbox = sandbox;
  }

  #path(suffix = ""): string {
    return sandboxPath(this.#sandbox.id, `/files${suffix}`);
  }

  /** Writes a whole file, atomically replacing it; parents are created. `mode` e.g. `0o644`. */
  async write(path: string, data: string | Uint8Array, options: { mode?: number | string } = {}): Promise<WriteResult> {
    const body = typeof data === "string" ? Buffer.from(data, "utf8") : data;
    return this.#put(path, body, body.byteLength, options.mode);
  }

  async #put(path: string, body: Uint8Array | AsyncIterable<Uint8Array>, length: number, mode?: number | string): Promise<WriteResult> {
    return this.#sandbox.client.json<WriteResult>("PUT", this.#path(), {
      query: { path, mode: typeof mode === "number" ? mode.toString(8).padStart(4, "0") : mode },
      body,
      // An explicit length keeps streamed uploads from being sent chunked.
      headers: { "content-type": "application/octet-stream", "content-length": length },
    });
  }

  /** A whole file's content. */
  async readBytes(path: string): Promise<Uint8Array> {
    return (await this.#sandbox.client.request("GET", this.#path(), { query: { path } })).bytes();
  }

  /** A whole file's content as UTF-8 text. */
  async read(path: string): Promise<string> {
    return Buffer.from(await this.readBytes(path)).toString("utf8");
  }

  /** The entries of a guest directory. */
  async list(path: string): Promise<DirEntry[]> {
    const items = await this.#sandbox.client.json<RawStat[]>("GET", this.#path("/list"), { query: { path } });
    return items.map((d) => ({ ...toInfo(d), name: d.name!, path: posix.join(path, d.name!) }));
  }

  /** Size, mode, kind and modification time (rejects with {@link GuestPathNotFoundError}). */
  async stat(path: string): Promise<FileInfo> {
    return toInfo(await this.#sandbox.client.json<RawStat>("GET", this.#path("/stat"), { query: { path } }));
  }

  async exists(path: string): Promise<boolean> {
    try {
      await this.stat(path);
      return true;
    } catch (e) {
      if (e instanceof GuestPathNotFoundError) return false;
      throw e;
    }
  }

  /** Creates a directory and its missing parents. */
  async mkdir(path: string): Promise<void> {
    await (await this.#sandbox.client.request("POST", this.#path("/mkdir"), { json: { path } })).bytes();
  }

  /** Removes a file, or a directory (non-empty ones only with `recursive`). */
  async remove(path: string, options: { recursive?: boolean } = {}): Promise<void> {
    const query = { path, recursive: options.recursive ? "true" : undefined };
    await (await this.#sandbox.client.request("DELETE", this.#path(), { query })).bytes();
  }

  /** Copies a local file into the guest, streaming it (any size). */
  async upload(localPath: string, remotePath: string, options: { mode?: number | string } = {}): Promise<WriteResult> {
    const { size } = await fsStat(localPath);
    return this.#put(remotePath, createReadStream(localPath), size, options.mode);
  }

  /** Copies a guest file to a local path, streaming it; resolves to the number of bytes. */
  async download(remotePath: string, localPath: string): Promise<number> {
    const res = await this.#sandbox.client.request("GET", this.#path(), { query: { path: remotePath } });
    let bytes = 0;
    async function* counted(): AsyncIterable<Uint8Array> {
      for await (const chunk of res.body) {
        bytes += chunk.byteLength;
        yield chunk;
      }
    }
    await pipeline(counted(), createWriteStream(localPath));
    return bytes;
  }

  /** Copies a local directory into the guest as one tar stream (modes, symlinks, empty directories and
   * mtimes kept); `remoteDir` is created if missing. Entries that would land outside it are refused
   * ({@link PathEscapeError}). */
  async uploadDir(localDir: string, remoteDir: string): Promise<UnpackResult> {
    return this.uploadTar(remoteDir, packDir(localDir));
  }

  /** Unpacks a tar stream (bytes or chunks) under the guest directory `remoteDir`. */
  async uploadTar(remoteDir: string, tar: Uint8Array | AsyncIterable<Uint8Array>): Promise<UnpackResult> {
    return this.#sandbox.client.json<UnpackResult>("PUT", this.#path("/dir"), {
      query: { path: remoteDir },
      body: tar,
      headers: { "content-type": "application/x-tar" },
      timeoutMs: null,
    });
  }

  /** A guest directory as a tar stream (symlinks stored as symlinks). */
  async downloadTar(remoteDir: string): Promise<AsyncIterable<Uint8Array>> {
    return (await this.#sandbox.client.request("GET", this.#path("/dir"), { query: { path: remoteDir }, timeoutMs: null })).body;
  }

  /** Copies a guest directory into `localDir` (created if missing); resolves to the entries unpacked.
   * Entries from the guest that would land outside `localDir` are refused. */
  async downloadDir(remoteDir: string, localDir: string): Promise<number> {
    return unpackTo(await this.downloadTar(remoteDir), localDir);
  }

  /** Writes several files in one request, in order, each atomically (parents created). */
  async writeFiles(files: BatchFile[]): Promise<WriteResult[]> {
    const r = await this.#sandbox.client.json<{ files: WriteResult[] }>("POST", this.#path("/batch"), { json: batchBody(files) });
    return r.files;
  }

  /** Watches a guest directory; resolves once the watch is in place. Iterate the events with
   * `for await`; leaving the loop (or `return()`) ends the watch in the guest. */
  async watch(path: string, options: { recursive?: boolean } = {}): Promise<AsyncGenerator<WatchEvent>> {
    const query = { path, recursive: options.recursive ? "true" : undefined };
    const res = await this.#sandbox.client.request("GET", this.#path("/watch"), { query, timeoutMs: null });
    return watchEvents(res.body);
  }
}

interface RawStat {
  name?: string;
  kind: string;
  size: number;
  mode: number;
  mtime_unix: number;
}

function toInfo(d: RawStat): FileInfo {
  return { kind: d.kind, size: d.size, mode: d.mode, mtime: new Date(d.mtime_unix * 1000) };
}

/**
 * A microVM sandbox. Make one with {@link Sandbox.create}, {@link Sandbox.connect} or
 * {@link Snapshot.restore}. Fields mirror the daemon's record as of the last call that returned it;
 * {@link Sandbox.refresh} fetches it again.
 */
export class Sandbox {
  readonly commands: Commands;
  readonly files: Files;
  /** Background processes (they outlive the client, and snapshots carry them). */
  readonly processes: Processes;
  /** @internal */
  readonly client: Client;

  id!: string;
  name!: string;
  template!: string;
  state!: SandboxState;
  memoryMib!: number;
  /** RAM its machine has: copies restored from its memory snapshots may have up to this (null: no headroom). */
  maxMemoryMib!: number | null;
  cpus!: number;
  diskSizeBytes!: number;
  env!: Record<string, string>;
  /** The sandbox's labels. */
  metadata!: Record<string, string>;
  ports!: PortMapping[];
  hostname!: string;
  mac!: string;
  accel!: string;
  /** Pid of the QEMU process while the VM runs. */
  pid!: number | null;
  /** Why the sandbox failed, with the last lines of its console. */
  error!: string | null;
  /** What it was made from: `template:NAME` or `snapshot:ID`. */
  origin!: string;
  restoredFrom!: string | null;
  /** Volumes attached to it (given at creation; kept by `stop()`/`start()`, not carried by snapshots). */
  volumes!: VolumeMount[];
  createdAt!: Date;
  updatedAt!: Date;
  /** Its timeout, idle timeout and what happens then; null without one. */
  lifetime!: Lifetime | null;
  /** Its continuous checkpoints; null without. */
  checkpointPolicy!: CheckpointPolicy | null;
  /** The private network it is in (bridged networking); null: none. */
  network!: string | null;
  /** Its own IPv4 address under bridged networking; null on user networking (every guest 10.0.2.15). */
  address!: string | null;
  /** Its own IPv6 address under bridged networking where the daemon gives guests IPv6; else null. */
  address6!: string | null;

  /** @internal Use the static constructors. */
  constructor(record: SandboxRecord, client: Client) {
    this.client = client;
    this.commands = new Commands(this);
    this.files = new Files(this);
    this.processes = new Processes(this);
    this.#apply(record);
  }

  #apply(r: SandboxRecord): this {
    this.id = r.id;
    this.name = r.name;
    this.template = r.template;
    this.state = r.state;
    this.memoryMib = r.memory_mib;
    this.maxMemoryMib = r.max_memory_mib ?? null;
    this.cpus = r.cpus;
    this.diskSizeBytes = r.disk_size_bytes;
    this.env = r.env ?? {};
    this.metadata = r.labels ?? {};
    this.ports = r.ports ?? [];
    this.hostname = r.hostname;
    this.mac = r.mac;
    this.accel = r.accel;
    this.pid = r.pid ?? null;
    this.error = r.error ?? null;
    this.origin = r.origin;
    this.restoredFrom = r.restored_from ?? null;
    this.volumes = mountsFromRecord(r.volumes);
    this.createdAt = new Date(r.created_at);
    this.updatedAt = new Date(r.updated_at);
    this.lifetime = lifetimeFromRecord(r.lifetime);
    this.checkpointPolicy = r.checkpoint_policy ?? null;
    this.network = r.network ?? null;
    this.address = r.address ?? null;
    this.address6 = r.address6 ?? null;
    return this;
  }

  /** Boots a new sandbox and resolves once its guest agent answers. */
  static async create(options: CreateSandboxOptions = {}): Promise<Sandbox> {
    const client = options.client ?? defaultClient();
    const body = {
      template: options.snapshot === undefined ? (options.template ?? "tiny") : undefined,
      name: options.name,
      memory_mib: options.memoryMib,
      max_memory_mib: options.maxMemoryMib,
      boot: options.boot || undefined,
      cpus: options.cpus,
      disk_size_gib: options.diskSizeGib,
      env: options.env,
      labels: options.metadata,
      ports: options.ports?.map(portJson),
      snapshot: options.snapshot,
      volumes: volumesJson(options.volumes),
      ...lifetimeJson(options),
      checkpoint_every: options.checkpointEvery,
      checkpoint_keep: options.checkpointKeep,
    };
    return new Sandbox(await client.json<SandboxRecord>("POST", "/v1/sandboxes", { json: body }), client);
  }

  /** An existing sandbox by id or name (rejects with {@link SandboxNotFoundError}). */
  static async connect(idOrName: string, options: WithClient = {}): Promise<Sandbox> {
    const client = options.client ?? defaultClient();
    return new Sandbox(await client.json<SandboxRecord>("GET", sandboxPath(idOrName)), client);
  }

  /** All sandboxes, or those carrying every `metadata` label given. */
  static async list(options: WithClient & { metadata?: Record<string, string> } = {}): Promise<Sandbox[]> {
    const client = options.client ?? defaultClient();
    const items = await client.json<SandboxRecord[]>("GET", "/v1/sandboxes", { query: labelQuery(options.metadata) });
    return items.map((r) => new Sandbox(r, client));
  }

  /**
   * Rolls a snapshot's source sandbox back to it, keeping the sandbox's id and name (recreated if it was
   * deleted). `resume: false` leaves it paused; `force` restores a snapshot restored before. For a new
   * sandbox from a snapshot use {@link Snapshot.restore}.
   */
  static async fromSnapshot(snapshotId: string, options: WithClient & { resume?: boolean; force?: boolean } = {}): Promise<Sandbox> {
    const client = options.client ?? defaultClient();
    const body = { resume: options.resume ?? true, force: options.force ?? false };
    return new Sandbox(await client.json<SandboxRecord>("POST", snapshotPath(snapshotId, "/restore"), { json: body }), client);
  }

  /** Fetches the current record. */
  async refresh(): Promise<this> {
    return this.#apply(await this.client.json<SandboxRecord>("GET", sandboxPath(this.id)));
  }

  /** Shortcut for `sandbox.commands.run()`. */
  run(cmd: string | string[], options?: RunOptions): Promise<CommandResult> {
    return this.commands.run(cmd, options);
  }

  /** The serial console output (kernel and init messages). */
  async logs(): Promise<string> {
    return (await this.client.request("GET", sandboxPath(this.id, "/logs"))).text();
  }

  /**
   * Captures the whole machine (memory, vCPUs, devices, disk). The sandbox is paused for the capture and
   * stays paused until {@link Sandbox.resume} (or pass `resumeSource: true`); or fork new sandboxes from
   * the snapshot. Snapshots are durable and outlive the sandbox; see {@link Snapshot}.
   */
  async snapshot(options: SnapshotOptions = {}): Promise<Snapshot> {
    const resumeSource = options.resumeSource ?? false;
    const body = {
      name: options.name,
      type: options.type ?? "full",
      leave_paused: !resumeSource,
      labels: options.metadata,
      ttl: options.ttl,
    };
    const r = await this.client.json<SnapshotRecord>("POST", sandboxPath(this.id, "/snapshots"), { json: body });
    this.state = resumeSource ? "running" : "paused";
    return new Snapshot(r, this.client);
  }

  /**
   * `count` new running sandboxes that continue from this one's current state (memory and disk). All or
   * nothing: if one child cannot start, none is left.
   */
  async fork(options: ForkOptions = {}): Promise<Sandbox[]> {
    const body = { count: options.count ?? 1, name: options.name, labels: options.metadata, ...lifetimeJson(options) };
    const r = await this.client.json<{ sandboxes: SandboxRecord[] }>("POST", sandboxPath(this.id, "/fork"), { json: body });
    return r.sandboxes.map((s) => new Sandbox(s, this.client));
  }

  /**
   * Publishes a guest TCP port on 127.0.0.1: on `host`, or on a free port the daemon picks. Works on a running
   * sandbox; publishing a published guest port again returns its mapping.
   */
  async publishPort(guest: number, host?: number): Promise<PortMapping> {
    const p = await this.client.json<PortMapping>("POST", sandboxPath(this.id, "/ports"), {
      json: portJson(host === undefined ? guest : { guest, host }),
    });
    await this.refresh();
    return p;
  }

  /** Stops forwarding a guest port (`port_not_found` if it is not published). */
  async unpublishPort(guest: number): Promise<void> {
    this.#apply(await this.client.json<SandboxRecord>("DELETE", sandboxPath(this.id, `/ports/${guest}`)));
  }

  /**
   * `127.0.0.1:HOST` where the guest's TCP `port` is reachable from the host; publishes it on a free host port
   * first if it is not published yet. Copies (resume, fork) have host ports of their own.
   */
  async getHost(port: number): Promise<string> {
    const p = this.ports.find((q) => q.guest === port) ?? (await this.publishPort(port));
    return `127.0.0.1:${p.host}`;
  }

  async #lifecycle(action: string): Promise<this> {
    return this.#apply(await this.client.json<SandboxRecord>("POST", sandboxPath(this.id, `/${action}`)));
  }

  /** Freezes the vCPUs; memory stays. */
  pause(): Promise<this> {
    return this.#lifecycle("pause");
  }

  /** Continues a paused sandbox (e.g. after {@link Sandbox.snapshot}) from exactly where it was; a running one stays as it is. */
  resume(): Promise<this> {
    return this.#lifecycle("resume");
  }

  /** Hibernates: saves the whole machine to disk and frees its RAM (the VM process exits). */
  stop(): Promise<this> {
    return this.#lifecycle("stop");
  }

  /** Brings a hibernated sandbox back where it was. */
  start(): Promise<this> {
    return this.#lifecycle("start");
  }

  /**
   * Renews or changes the lifetime: `timeout` seconds of life from now (0 removes the limit); the other
   * fields change when given. {@link Sandbox.lifetime} shows the new deadlines.
   */
  async setTimeout(timeout?: number, options: Omit<LifetimeOptions, "timeout"> = {}): Promise<this> {
    const body = lifetimeJson({ ...options, timeout });
    return this.#apply(await this.client.json<SandboxRecord>("POST", sandboxPath(this.id, "/timeout"), { json: body }));
  }

  /**
   * Takes a checkpoint (a memory snapshot) every `every` seconds in the background, keeping the newest
   * `keep` (default 10); `every` 0 removes the policy.
   */
  async setCheckpointPolicy(every: number, options: { keep?: number } = {}): Promise<this> {
    const body = { every, keep: options.keep };
    return this.#apply(
      await this.client.json<SandboxRecord>("PUT", sandboxPath(this.id, "/checkpoint-policy"), { json: body }),
    );
  }

  /** Removes the checkpoint policy; the checkpoints taken stay. */
  async clearCheckpointPolicy(): Promise<this> {
    return this.#apply(await this.client.json<SandboxRecord>("DELETE", sandboxPath(this.id, "/checkpoint-policy")));
  }

  /** The sandbox's checkpoints, oldest first (each with `pauseMs`, the pause it cost). */
  async checkpoints(): Promise<Snapshot[]> {
    const list = await this.client.json<SnapshotRecord[]>("GET", sandboxPath(this.id, "/checkpoints"));
    return list.map((r) => new Snapshot(r, this.client));
  }

  /**
   * Rolls the sandbox back to a checkpoint: `to` is a snapshot id, or a time (RFC 3339, or `"90s"`, `"5m"`,
   * `"2h"` ago: the newest checkpoint taken at or before it). Same id and name; running afterwards.
   */
  async rewind(to: string): Promise<this> {
    return this.#apply(await this.client.json<SandboxRecord>("POST", sandboxPath(this.id, "/rewind"), { json: { to } }));
  }

  /** Deletes the sandbox: its VM, disk and memory are freed. */
  async delete(): Promise<void> {
    await (await this.client.request("DELETE", sandboxPath(this.id))).bytes();
    this.state = "deleting";
  }

  /** Same as {@link Sandbox.delete}. */
  kill(): Promise<void> {
    return this.delete();
  }

  /** Deletes the sandbox unless it is already gone; handy in `finally` blocks. */
  async dispose(): Promise<void> {
    try {
      await this.delete();
    } catch (e) {
      if (!(e instanceof SandboxNotFoundError)) throw e;
    }
  }

  /**
   * `await using sb = await Sandbox.create()` deletes the sandbox when the block is left, also by an
   * exception (TypeScript >= 5.2 compiles `await using`; Node >= 20 has `Symbol.asyncDispose`). Same as
   * {@link Sandbox.dispose}: a sandbox that is already gone is fine.
   */
  [Symbol.asyncDispose](): Promise<void> {
    return this.dispose();
  }

  toString(): string {
    return `Sandbox(${this.id}, ${this.name}, ${this.state})`;
  }
}

function portJson(p: PortSpec): { guest: number; host?: number } {
  return typeof p === "number" ? { guest: p } : p.host === undefined ? { guest: p.guest } : { guest: p.guest, host: p.host };
}
