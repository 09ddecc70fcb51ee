/**
 * TypeScript SDK for kiln, the self-hosted microVM sandbox engine.
 *
 * ```ts
 * import { Sandbox } from "kiln-sdk";
 * const sb = await Sandbox.create({ template: "tiny" });
 * console.log((await sb.commands.run("echo hello")).stdout);
 * const snap = await sb.snapshot({ name: "checkpoint" });
 * const copy = await snap.restore("copy");
 * ```
 *
 * The daemon is found through `KILN_SOCKET` / `KILN_URL` + `KILN_TOKEN` or the default socket; pass
 * `{ client: new Client({...}) }` to use another.
 */
export { Client, defaultClient, defaultDataDir, defaultSocket, setDefaultClient } from "./client.js";
export type { ClientOptions, WithClient } from "./client.js";
export {
  AuthenticationError,
  CapacityError,
  ConflictError,
  GuestPathNotFoundError,
  InvalidRequestError,
  KilnConnectionError,
  KilnError,
  NotFoundError,
  SandboxNotFoundError,
  STATUS_BY_CODE,
  SnapshotAlreadyExistsError,
  SnapshotNotFoundError,
  TimeoutError,
  errorFromCode,
} from "./errors.js";
export { Commands, Files, Sandbox } from "./sandbox.js";
export type { CreateSandboxOptions, ForkOptions, RunOptions, SnapshotOptions } from "./sandbox.js";
export { Snapshot } from "./snapshot.js";
export type { RestoreOptions } from "./snapshot.js";
export type {
  CommandResult,
  DirEntry,
  FileInfo,
  PortMapping,
  SandboxState,
  SnapshotDeleted,
  SnapshotType,
  WriteResult,
} from "./types.js";
