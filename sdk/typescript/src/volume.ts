import { Client, type WithClient, defaultClient, volumePath } from "./client.js";
import { InvalidRequestError } from "./errors.js";
import type { VolumeAttachment, VolumeMount, VolumeMountRecord, VolumeRecord, VolumeSpec } from "./types.js";

export interface CreateVolumeOptions extends WithClient {
  /** Unique name: lowercase letters, digits and `-`. */
  name: string;
  /** Size of its filesystem in MiB (default 1024). It is sparse: host disk is used only as it fills. */
  sizeMib?: number;
  /** Labels stored with it. */
  labels?: Record<string, string>;
  /** Same as `labels` (the SDK's usual name for labels); merged with them. */
  metadata?: Record<string, string>;
}

/**
 * A durable ext4 disk that lives outside any sandbox, identified by its name. Attach it when making a
 * sandbox (`Sandbox.create({ volumes: ["cache:/cache"] })` or `snapshot.restore(name, { volumes })`); its
 * data outlives every sandbox that used it. Hibernation (`stop()`/`start()`) keeps it attached; snapshots,
 * restored copies and forks do not carry it.
 */
export class Volume {
  /** @internal */
  readonly client: Client;

  name!: string;
  /** Capacity of its filesystem. */
  sizeBytes!: number;
  /** Space the (sparse) volume file takes on the host's disk. */
  allocatedBytes!: number;
  /** The volume's labels. */
  metadata!: Record<string, string>;
  createdAt!: Date;
  /** Sandboxes it is attached to; a volume can only be deleted when there are none. */
  attachments!: VolumeAttachment[];

  /** @internal Use {@link Volume.create} or {@link Volume.get}. */
  constructor(record: VolumeRecord, client: Client) {
    this.client = client;
    this.#apply(record);
  }

  #apply(r: VolumeRecord): this {
    this.name = r.name;
    this.sizeBytes = r.size_bytes;
    this.allocatedBytes = r.allocated_bytes ?? 0;
    this.metadata = r.labels ?? {};
    this.createdAt = new Date(r.created_at);
    this.attachments = (r.attachments ?? []).map((a) => ({
      sandboxId: a.sandbox_id,
      sandboxName: a.sandbox_name,
      path: a.path,
      readOnly: a.read_only ?? false,
    }));
    return this;
  }

  /** Same as {@link Volume.name}. */
  get id(): string {
    return this.name;
  }

  get sizeMib(): number {
    return Math.floor(this.sizeBytes / 2 ** 20);
  }

  /** Whether any sandbox has it attached (as of the last fetch). */
  get inUse(): boolean {
    return this.attachments.length > 0;
  }

  /** Makes an empty volume (rejects with {@link VolumeAlreadyExistsError} if the name is taken). */
  static async create(options: CreateVolumeOptions): Promise<Volume> {
    const client = options.client ?? defaultClient();
    const labels = options.labels || options.metadata ? { ...options.labels, ...options.metadata } : undefined;
    const body = { name: options.name, size_mib: options.sizeMib, labels };
    return new Volume(await client.json<VolumeRecord>("POST", "/v1/volumes", { json: body }), client);
  }

  /** A volume by name (rejects with {@link VolumeNotFoundError}). */
  static async get(name: string, options: WithClient = {}): Promise<Volume> {
    const client = options.client ?? defaultClient();
    return new Volume(await client.json<VolumeRecord>("GET", volumePath(name)), client);
  }

  /** Every volume. */
  static async list(options: WithClient = {}): Promise<Volume[]> {
    const client = options.client ?? defaultClient();
    return (await client.json<VolumeRecord[]>("GET", "/v1/volumes")).map((r) => new Volume(r, client));
  }

  /**
   * Deletes a volume and its data by name. Rejects with {@link VolumeInUseError} while any sandbox (even a
   * stopped one) has it attached.
   */
  static async delete(name: string, options: WithClient = {}): Promise<void> {
    const client = options.client ?? defaultClient();
    await (await client.request("DELETE", volumePath(name))).bytes();
  }

  /** Deletes this volume; see the static {@link Volume.delete}. */
  delete(): Promise<void> {
    return Volume.delete(this.name, { client: this.client });
  }

  /** Fetches the current record (attachments, allocated bytes). */
  async refresh(): Promise<this> {
    return this.#apply(await this.client.json<VolumeRecord>("GET", volumePath(this.name)));
  }

  toString(): string {
    return `Volume(${this.name}, ${this.sizeMib} MiB, ${this.attachments.length} attachments)`;
  }
}

function badVolume(spec: unknown, why: string): InvalidRequestError {
  return new InvalidRequestError(
    `invalid volume ${JSON.stringify(spec)}: ${why}; use "NAME:/PATH", "NAME:/PATH:ro", [NAME, PATH, READ_ONLY?] ` +
      `or { volume: NAME, path: PATH, readOnly?: BOOL }`,
    "invalid_request",
  );
}

function volumeName(v: unknown): string {
  if (typeof v === "string") return v;
  if (v && typeof v === "object" && typeof (v as { name?: unknown }).name === "string") return (v as { name: string }).name;
  throw badVolume(v, "the volume must be a name or a Volume");
}

/** One volume spec as a {@link VolumeMount}; the daemon checks names, paths and the count. */
export function parseVolume(spec: VolumeSpec): VolumeMount {
  if (typeof spec === "string") {
    // Like the CLI's --volume: NAME:/PATH or NAME:/PATH:ro (or :rw).
    const colon = spec.indexOf(":");
    if (colon < 0) throw badVolume(spec, "no ':' between the volume's name and the mount path");
    const volume = spec.slice(0, colon);
    const rest = spec.slice(colon + 1);
    const last = rest.lastIndexOf(":");
    if (last < 0) return { volume, path: rest, readOnly: false };
    const flag = rest.slice(last + 1);
    if (flag !== "ro" && flag !== "rw") throw badVolume(spec, `unknown flag '${flag}' (only 'ro' or 'rw')`);
    return { volume, path: rest.slice(0, last), readOnly: flag === "ro" };
  }
  if (Array.isArray(spec)) {
    if (spec.length < 2 || spec.length > 3) throw badVolume(spec, "an array needs 2 or 3 items");
    return { volume: volumeName(spec[0]), path: String(spec[1]), readOnly: Boolean(spec[2]) };
  }
  if (spec && typeof spec === "object" && "volume" in spec && "path" in spec) {
    return { volume: volumeName(spec.volume), path: String(spec.path), readOnly: Boolean(spec.readOnly) };
  }
  throw badVolume(spec, "not a volume spec");
}

/** @internal The `volumes` field of a create or resume body (`undefined` when none). */
export function volumesJson(volumes: readonly VolumeSpec[] | undefined): VolumeMountRecord[] | undefined {
  if (volumes === undefined || volumes.length === 0) return undefined;
  return volumes.map((v) => {
    const m = parseVolume(v);
    return { volume: m.volume, path: m.path, read_only: m.readOnly };
  });
}

/** @internal */
export function mountsFromRecord(records: VolumeMountRecord[] | undefined): VolumeMount[] {
  return (records ?? []).map((v) => ({ volume: v.volume, path: v.path, readOnly: v.read_only ?? false }));
}
