import { createReadStream, createWriteStream } from "node:fs";
import { rename, stat as fsStat, unlink } from "node:fs/promises";
import { pipeline } from "node:stream/promises";
import { Client, type WithClient, defaultClient, snapshotPath } from "./client.js";
import { Sandbox } from "./sandbox.js";
import type { LifetimeOptions, SandboxRecord, SnapshotDeleted, SnapshotRecord, SnapshotType, VolumeSpec } from "./types.js";
import { lifetimeJson } from "./types.js";
import { volumesJson } from "./volume.js";

export interface RestoreOptions extends LifetimeOptions {
  /**
   * Memory snapshots: from the snapshot's own up to the `maxMemoryMib` its sandbox was created with
   * (else `resource_override_refused`, a {@link ConflictError}); `disk` snapshots may change it.
   */
  memoryMib?: number;
  /** vCPUs of the copy: for memory snapshots 1 up to the vCPUs its machine has, the same processes go on. */
  cpus?: number;
  /** `disk` snapshots only; at least the snapshot's. */
  diskSizeGib?: number;
  metadata?: Record<string, string>;
  /**
   * Volumes to attach, as for `Sandbox.create`. Snapshots do not capture volumes: without this the copy
   * starts with none (a volume its source had mounted is gone from it).
   */
  volumes?: readonly VolumeSpec[];
}

/**
 * A durable capture of a sandbox. {@link Snapshot.id} is the name given to `sandbox.snapshot({ name })` (or
 * a generated `snap-<sandbox>-<time>`); {@link Snapshot.saveNamed} adds further names. Every static method
 * takes the id or any name. A snapshot stays until deleted, whatever happens to its sandbox.
 */
export class Snapshot {
  /** @internal */
  readonly client: Client;

  id!: string;
  /** The sandbox it was taken from (which may since have been deleted). */
  sandboxId!: string;
  sandboxName!: string;
  type!: SnapshotType;
  /** What a diff or disk snapshot builds on: `template:NAME` or `snapshot:ID`. */
  parent!: string | null;
  /** For a diff of a sandbox whose create resumed its template's snapshot: that template snapshot (`parent` is then `template:NAME`). */
  templateSnapshot!: string | null;
  template!: string;
  memoryMib!: number;
  /** A copy restored from this memory snapshot may have from `memoryMib` up to this (null: no headroom). */
  maxMemoryMib!: number | null;
  cpus!: number;
  diskSizeBytes!: number;
  /** Space its own files take on disk. */
  sizeBytes!: number;
  /** The snapshot's labels. */
  metadata!: Record<string, string>;
  /** Whether it has been rolled back into its source sandbox. */
  restored!: boolean;
  restoredAt!: Date | null;
  createdAt!: Date;
  /** Copies resumed ahead of time and ready to hand out: the next resume only continues one. */
  warmSpares!: number;
  /** Names given with {@link Snapshot.saveNamed} (the id is not repeated here). */
  names!: string[];
  /** When its `ttl` runs out; it is then deleted as soon as nothing depends on it. */
  expiresAt!: Date | null;
  /** How long its source was paused for the capture (ms; null for older snapshots). */
  pauseMs!: number | null;

  /** @internal Use {@link Snapshot.get} or `sandbox.snapshot()`. */
  constructor(record: SnapshotRecord, client: Client) {
    this.client = client;
    this.#apply(record);
  }

  #apply(r: SnapshotRecord): this {
    this.id = r.id;
    this.sandboxId = r.sandbox_id;
    this.sandboxName = r.sandbox_name;
    this.type = r.type;
    this.parent = r.parent ?? null;
    this.templateSnapshot = r.template_snapshot ?? null;
    this.template = r.template;
    this.memoryMib = r.memory_mib;
    this.maxMemoryMib = r.max_memory_mib ?? null;
    this.cpus = r.cpus;
    this.diskSizeBytes = r.disk_size_bytes;
    this.sizeBytes = r.size_bytes;
    this.metadata = r.labels ?? {};
    this.restored = r.restored;
    this.restoredAt = r.restored_at ? new Date(r.restored_at) : null;
    this.createdAt = new Date(r.created_at);
    this.warmSpares = r.warm_spares ?? 0;
    this.names = r.names ?? [];
    this.expiresAt = r.expires_at ? new Date(r.expires_at) : null;
    this.pauseMs = r.pause_ms ?? null;
    return this;
  }

  /** Same as {@link Snapshot.id}. */
  get name(): string {
    return this.id;
  }

  /** A snapshot by id or name (rejects with {@link SnapshotNotFoundError}). */
  static async get(name: string, options: WithClient = {}): Promise<Snapshot> {
    const client = options.client ?? defaultClient();
    return new Snapshot(await client.json<SnapshotRecord>("GET", snapshotPath(name)), client);
  }

  /** Snapshots (each with its {@link Snapshot.names}), optionally only those of one source sandbox (id or name) and/or with every label given. */
  static async list(options: WithClient & { sandboxId?: string; metadata?: Record<string, string> } = {}): Promise<Snapshot[]> {
    const client = options.client ?? defaultClient();
    const query: [string, string][] = Object.entries(options.metadata ?? {}).map(([k, v]) => ["label", `${k}=${v}`]);
    if (options.sandboxId !== undefined) query.push(["sandbox", options.sandboxId]);
    const items = await client.json<SnapshotRecord[]>("GET", "/v1/snapshots", { query });
    return items.map((r) => new Snapshot(r, client));
  }

  /**
   * Deletes a snapshot (by id or any name) from disk, with all its names. Sandboxes running from it keep its files (`filesKeptFor`); refused with
   * {@link ConflictError} while diff snapshots build on it.
   */
  static async delete(name: string, options: WithClient = {}): Promise<SnapshotDeleted> {
    const client = options.client ?? defaultClient();
    const r = await client.json<{ id: string; files_kept_for?: string[] }>("DELETE", snapshotPath(name));
    return { id: r.id, filesKeptFor: r.files_kept_for ?? [] };
  }

  /** Deletes this snapshot; see the static {@link Snapshot.delete}. */
  delete(): Promise<SnapshotDeleted> {
    return Snapshot.delete(this.id, { client: this.client });
  }

  /** Fetches the current record (e.g. `restored`). */
  async refresh(): Promise<this> {
    return this.#apply(await this.client.json<SnapshotRecord>("GET", snapshotPath(this.id)));
  }

  /**
   * A **new** sandbox that continues exactly where the snapshot was (new id, name and MAC); repeatable.
   * Memory snapshots keep their RAM size and may change their vCPUs; `disk` snapshots cold-boot, so any
   * resource may change. To
   * roll the source sandbox back instead, use {@link Sandbox.fromSnapshot}.
   */
  async restore(name?: string, options: RestoreOptions = {}): Promise<Sandbox> {
    const body = {
      name,
      memory_mib: options.memoryMib,
      cpus: options.cpus,
      disk_size_gib: options.diskSizeGib,
      labels: options.metadata,
      volumes: volumesJson(options.volumes),
      ...lifetimeJson(options),
    };
    return new Sandbox(await this.client.json<SandboxRecord>("POST", snapshotPath(this.id, "/resume"), { json: body }), this.client);
  }

  /**
   * Keeps this snapshot under `name` as well, beyond the life of its sandbox: {@link Snapshot.get},
   * `restore`, `delete` (and the CLI and REST API) find it by that name. Ids and names share one namespace:
   * a name another snapshot has as its id or name rejects with {@link SnapshotAlreadyExistsError}; giving
   * a name this snapshot already has changes nothing. Names follow the id rule (`[a-z0-9][a-z0-9_-]*`).
   */
  async saveNamed(name: string): Promise<this> {
    return this.#apply(
      await this.client.json<SnapshotRecord>("POST", snapshotPath(this.id, "/names"), { json: { name } }),
    );
  }

  /**
   * Writes this snapshot to a bundle file (streamed; compressed, checksummed) for {@link Snapshot.import}
   * on another host; resolves to the bundle's size. A diff snapshot carries its base and imports as a full
   * one, unless `withoutBase`: then the importing host must have the same base. The file appears only once
   * the export is complete.
   */
  async export(path: string, options: { withoutBase?: boolean } = {}): Promise<number> {
    const res = await this.client.request("GET", snapshotPath(this.id, "/export"), {
      query: { without_base: options.withoutBase ? "true" : undefined },
      timeoutMs: null,
    });
    const partial = `${path}.kiln-partial`;
    let bytes = 0;
    async function* counted(): AsyncIterable<Uint8Array> {
      for await (const chunk of res.body) {
        bytes += chunk.byteLength;
        yield chunk;
      }
    }
    try {
      await pipeline(counted(), createWriteStream(partial));
    } catch (e) {
      await unlink(partial).catch(() => undefined);
      throw e;
    }
    await rename(partial, path);
    return bytes;
  }

  /**
   * Adds the snapshot in a bundle file (from {@link Snapshot.export}), verified whole before it appears.
   * Rejects with {@link SnapshotCorruptError} (the message names the byte offset) for a damaged bundle,
   * {@link SnapshotIncompatibleError} when this host cannot resume it, and
   * {@link SnapshotAlreadyExistsError} when its id (or `name`) is taken.
   */
  static async import(path: string, options: WithClient & { name?: string } = {}): Promise<Snapshot> {
    const client = options.client ?? defaultClient();
    const { size } = await fsStat(path);
    const record = await client.json<SnapshotRecord>("POST", "/v1/snapshots/import", {
      query: { name: options.name },
      body: createReadStream(path),
      headers: { "content-type": "application/octet-stream", "content-length": size },
      timeoutMs: null,
    });
    return new Snapshot(record, client);
  }

  toString(): string {
    return `Snapshot(${this.id}, ${this.type}, from ${this.sandboxName})`;
  }
}
