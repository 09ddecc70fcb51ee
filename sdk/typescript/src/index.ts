/**
 * TypeScript SDK for kiln, the self-hosted microVM sandbox engine.
 *
 * ```ts
 * import { Sandbox, Volume } from "kiln-sdk";
 * const sb = await Sandbox.create({ template: "tiny" });
 * console.log((await sb.commands.run("echo hello")).stdout);
 * const snap = await sb.snapshot({ name: "checkpoint" });
 * const copy = await snap.restore("copy");
 * const cache = await Volume.create({ name: "cache", sizeMib: 512 }); // durable: outlives every sandbox
 * const worker = await Sandbox.create({ volumes: ["cache:/cache"] });
 * ```
 *
 * The daemon is found through `KILN_SOCKET` / `KILN_URL` + `KILN_TOKEN` or the default socket; pass
 * `{ client: new Client({...}) }` to use another.
 */
export { Client, DEFAULT_RETRY, defaultClient, defaultDataDir, defaultSocket, setDefaultClient } from "./client.js";
export type { ClientOptions, RetryPolicy, WithClient } from "./client.js";
export {
  AgentOutdatedError,
  AgentUnavailableError,
  AuthenticationError,
  BootFailedError,
  BY_CODE,
  CapacityError,
  CapacityExceededError,
  ConflictError,
  GuestDiskFullError,
  GuestError,
  GuestPathConflictError,
  GuestPathNotFoundError,
  GuestPermissionDeniedError,
  ImageBuilderMissingError,
  ImageInUseError,
  ImageNotFoundError,
  InsufficientStorageError,
  InternalError,
  RemoteAlreadyExistsError,
  RemoteNotFoundError,
  RemoteUnavailableError,
  InvalidRequestError,
  KilnConnectionError,
  KilnError,
  MethodNotAllowedError,
  NotFoundError,
  OperationInterruptedError,
  OperationNotFoundError,
  PayloadTooLargeError,
  PortInUseError,
  PortNotFoundError,
  ProcessNotFoundError,
  RateLimitedError,
  ResourceOverrideRefusedError,
  RouteNotFoundError,
  SandboxBusyError,
  SandboxNameTakenError,
  PathEscapeError,
  SandboxNotFoundError,
  SandboxNotRunningError,
  SandboxUnresponsiveError,
  ServerError,
  SnapshotAlreadyExistsError,
  SnapshotAlreadyRestoredError,
  SnapshotBaseChangedError,
  SnapshotBaseMissingError,
  SnapshotCorruptError,
  ExecFailedError,
  SnapshotIncompatibleError,
  SnapshotInUseError,
  SnapshotNotFoundError,
  STATUS_BY_CODE,
  TimeoutError,
  VmFailedError,
  VolumeAlreadyExistsError,
  VolumeInUseError,
  VolumeNotFoundError,
  errorFromCode,
} from "./errors.js";
export { Commands, Files, Sandbox } from "./sandbox.js";
export type { BatchFile, UnpackResult, WatchEvent } from "./dirs.js";
export type { CreateSandboxOptions, ForkOptions, RunOptions, SnapshotOptions } from "./sandbox.js";
export { Processes } from "./process.js";
export type { LogsOptions, ProcessInfo, ProcessOutput, StartProcessOptions } from "./process.js";
export { Snapshot } from "./snapshot.js";
export type { RestoreOptions } from "./snapshot.js";
export { Volume, parseVolume } from "./volume.js";
export { Operation } from "./operation.js";
export { events } from "./events.js";
export type { EventsOptions, KilnEvent } from "./events.js";
export type { ListOperationsOptions, OperationRecord, OperationState } from "./operation.js";
export type { CreateVolumeOptions } from "./volume.js";
export type {
  CommandResult,
  DirEntry,
  FileInfo,
  Lifetime,
  CheckpointPolicy,
  LifetimeOptions,
  OnTimeout,
  PortMapping,
  PortSpec,
  SandboxState,
  SnapshotDeleted,
  SnapshotType,
  VolumeAttachment,
  VolumeMount,
  VolumeSpec,
  WriteResult,
} from "./types.js";
