/** Records as the daemon sends them (snake_case JSON), and the SDK's public value types. */

export type SandboxState = "creating" | "running" | "paused" | "stopped" | "failed" | "deleting";
export type SnapshotType = "full" | "diff" | "disk";

/** A TCP port of the guest forwarded to `127.0.0.1:host` on the host. */
export interface PortMapping {
  host: number;
  guest: number;
  /** The daemon picked the host port (copies made by resume or fork always get their own). */
  auto?: boolean;
}

/** A guest port to publish: `8080` (a free host port is picked) or `{ guest, host? }`. */
export type PortSpec = number | { guest: number; host?: number };

/** @internal */
export interface SandboxRecord {
  id: string;
  name: string;
  template: string;
  state: SandboxState;
  memory_mib: number;
  max_memory_mib?: number | null;
  cpus: number;
  disk_size_bytes: number;
  env: Record<string, string>;
  labels: Record<string, string>;
  ports: PortMapping[];
  hostname: string;
  mac: string;
  accel: string;
  pid?: number | null;
  error?: string | null;
  created_at: string;
  updated_at: string;
  origin: string;
  restored_from?: string | null;
  volumes?: VolumeMountRecord[];
  lifetime?: LifetimeRecord | null;
  checkpoint_policy?: CheckpointPolicy | null;
  network?: string | null;
  address?: string | null;
  address6?: string | null;
}

/** A sandbox's continuous checkpoints: one every `every` seconds, the newest `keep` kept. */
export interface CheckpointPolicy {
  every: number;
  keep: number;
}

/** @internal */
export interface LifetimeRecord {
  timeout?: number | null;
  expires_at?: string | null;
  idle_timeout?: number | null;
  idle_expires_at?: string | null;
  on_timeout: OnTimeout;
  auto_resume: boolean;
}

/** What happens when a sandbox's timeout or idle timeout runs out. */
export type OnTimeout = "hibernate" | "delete";

/** A sandbox's lifetime policy and deadlines. */
export interface Lifetime {
  /** Seconds of life, counted from creation, every start or wake, and the last `setTimeout`. */
  timeout: number | null;
  expiresAt: Date | null;
  /** Seconds without use (API calls, background process output) before `onTimeout` applies. */
  idleTimeout: number | null;
  /** When the idle timeout runs out if nothing happens before (only while the VM runs). */
  idleExpiresAt: Date | null;
  onTimeout: OnTimeout;
  /** A hibernated sandbox is started again by the first exec, file, process or port call. */
  autoResume: boolean;
}

/** Lifetime options of create, restore and `setTimeout`. */
export interface LifetimeOptions {
  /** Seconds of life (renew with `setTimeout`; 0 there removes the limit). */
  timeout?: number;
  /** Seconds without use before `onTimeout` applies (0 there removes it). */
  idleTimeout?: number;
  /** `hibernate` (default: RAM to disk, resumable) or `delete`. */
  onTimeout?: OnTimeout;
  /** Start it again when it is used while hibernated (default true with a lifetime). */
  autoResume?: boolean;
}

/** @internal */
export function lifetimeJson(o: LifetimeOptions): Record<string, unknown> {
  return { timeout: o.timeout, idle_timeout: o.idleTimeout, on_timeout: o.onTimeout, auto_resume: o.autoResume };
}

/** @internal */
export function lifetimeFromRecord(r: LifetimeRecord | null | undefined): Lifetime | null {
  if (!r) return null;
  const date = (s: string | null | undefined) => (s ? new Date(s) : null);
  return {
    timeout: r.timeout ?? null,
    expiresAt: date(r.expires_at),
    idleTimeout: r.idle_timeout ?? null,
    idleExpiresAt: date(r.idle_expires_at),
    onTimeout: r.on_timeout,
    autoResume: r.auto_resume,
  };
}

/** @internal */
export interface VolumeMountRecord {
  volume: string;
  path: string;
  read_only: boolean;
}

/** @internal */
export interface VolumeRecord {
  name: string;
  size_bytes: number;
  allocated_bytes: number;
  labels: Record<string, string>;
  created_at: string;
  attachments: { sandbox_id: string; sandbox_name: string; path: string; read_only: boolean }[];
}

/** @internal */
export interface SnapshotRecord {
  id: string;
  sandbox_id: string;
  sandbox_name: string;
  type: SnapshotType;
  parent?: string | null;
  template_snapshot?: string | null;
  template: string;
  memory_mib: number;
  max_memory_mib?: number | null;
  cpus: number;
  disk_size_bytes: number;
  size_bytes: number;
  labels: Record<string, string>;
  restored: boolean;
  restored_at?: string | null;
  created_at: string;
  warm_spares?: number;
  names?: string[];
  expires_at?: string | null;
  pause_ms?: number | null;
}

/** The outcome of a command. A non-zero exit is not an error: check `ok` or `exitCode`. */
export interface CommandResult {
  stdout: string;
  stderr: string;
  /** `null` when the command was killed by a signal. */
  exitCode: number | null;
  signal: number | null;
  /** The command ran past its `timeoutMs` and was killed. */
  timedOut: boolean;
  durationMs: number;
  /** Collected output passed the daemon's cap (1 MiB each of stdout and stderr) and was cut;
   * pass `onStdout`/`onStderr` (streaming) to receive all of it. */
  truncated: boolean;
  /** Exit code 0 and not timed out. */
  ok: boolean;
}

/** Metadata of a guest path. */
export interface FileInfo {
  /** `file`, `dir`, `symlink` or `other`. */
  kind: string;
  size: number;
  /** Permission bits, e.g. `0o644`. */
  mode: number;
  mtime: Date;
}

/** One entry of a directory listing. */
export interface DirEntry extends FileInfo {
  name: string;
  /** The entry's absolute guest path. */
  path: string;
}

export interface WriteResult {
  path: string;
  bytes: number;
}

export interface SnapshotDeleted {
  id: string;
  /** Sandboxes still running on the snapshot's files; the data is freed when the last is gone. */
  filesKeptFor: string[];
}

/** A volume attached to a sandbox (`sandbox.volumes`). */
export interface VolumeMount {
  /** The volume's name. */
  volume: string;
  /** Absolute mount point in the guest, e.g. `/data`. */
  path: string;
  /** Read-only attachments may be shared by several sandboxes; a read-write one is exclusive. */
  readOnly: boolean;
}

/**
 * A volume to attach when making a sandbox: `"name:/path"` or `"name:/path:ro"`, `[name, path, readOnly?]`,
 * or `{ volume, path, readOnly? }`; `name`/`volume` may also be a {@link Volume} (anything with a `name`).
 */
export type VolumeSpec =
  | string
  | readonly [volume: string | { readonly name: string }, path: string, readOnly?: boolean]
  | { volume: string | { readonly name: string }; path: string; readOnly?: boolean };

/** A sandbox a volume is attached to (running, paused, stopped or failed). */
export interface VolumeAttachment {
  sandboxId: string;
  sandboxName: string;
  path: string;
  readOnly: boolean;
}
