/**
 * Errors thrown by the SDK. Every error the daemon reports (`{"error": {"code", "message"}}`) becomes a
 * {@link KilnError} subclass chosen by its code, falling back to its HTTP status; `message` is the
 * server's explanation, which says what to do about it.
 */

export class KilnError extends Error {
  /** The daemon's stable code (`sandbox_not_found`, ...) or a client one (`connection_failed`, `client_timeout`). */
  readonly code: string;
  /** The HTTP status, or `undefined` when the error arose in the client. */
  readonly status: number | undefined;
  /** Seconds the daemon asked to wait before trying again (its `Retry-After` header), if it said. */
  retryAfter: number | undefined;

  constructor(message: string, code = "internal", status?: number, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.status = status;
    this.name = new.target.name;
  }
}

/** The daemon could not be reached, or the connection broke. */
export class KilnConnectionError extends KilnError {}
/** A parameter is out of range or malformed (400); the message names the rule. */
export class InvalidRequestError extends KilnError {}
/** 400 `path_escape`: a tar entry of a directory upload would land outside the target directory. */
export class PathEscapeError extends InvalidRequestError {}
/** Missing or wrong bearer token over TCP (401). */
export class AuthenticationError extends KilnError {}
/** Something named in the request does not exist (404). */
export class NotFoundError extends KilnError {}
export class SandboxNotFoundError extends NotFoundError {}
export class SnapshotNotFoundError extends NotFoundError {}
/** A path inside the guest does not exist. */
export class GuestPathNotFoundError extends NotFoundError {}
/** No volume has the given name (also when a sandbox is made with one that does not exist). */
export class VolumeNotFoundError extends NotFoundError {}
/** The request conflicts with the current state (409): a name in use, a sandbox not running, a volume in use, ... */
export class ConflictError extends KilnError {}
export class SnapshotAlreadyExistsError extends ConflictError {}
export class VolumeAlreadyExistsError extends ConflictError {}
/**
 * The volume is attached where that is not allowed: deleting a volume a sandbox has attached, attaching one
 * another sandbox has read-write, or attaching read-write one that is attached anywhere.
 */
export class VolumeInUseError extends ConflictError {}
/**
 * 429: the daemon's sandbox count or memory limit is reached, or this client is rate limited. The client
 * already retried (see {@link RetryPolicy}) before throwing; `retryAfter` is the daemon's advice.
 */
export class CapacityError extends KilnError {}
/** A boot or command took too long on the server (504), or the client gave up waiting. */
export class TimeoutError extends KilnError {}
/** The daemon or a VM failed (5xx other than 504): see the subclass and the message. */
export class ServerError extends KilnError {}

// One class per code the daemon can return (crates/kiln-core/src/error.rs plus the HTTP layer's own);
// test/errors.test.mjs fails when the daemon gains a code that is missing here.

/** No guest image has that name (build it with `kiln image build`). */
export class ImageNotFoundError extends NotFoundError {}
/** No operation has that id. */
export class OperationNotFoundError extends NotFoundError {}
/** The guest port is not published on this sandbox. */
export class PortNotFoundError extends NotFoundError {}
/** No background process with that pid in the sandbox. */
export class ProcessNotFoundError extends NotFoundError {}
/** The daemon has no such API route (it may be older than this SDK). */
export class RouteNotFoundError extends NotFoundError {}
/** The guest refused access to a path (403). */
export class GuestPermissionDeniedError extends KilnError {}
/** The route exists but not with this HTTP method (405). */
export class MethodNotAllowedError extends KilnError {}
/** The request body is over the daemon's limit (413; `kiln serve --max-body-bytes`). */
export class PayloadTooLargeError extends KilnError {}
/** Another sandbox has that name. */
export class SandboxNameTakenError extends ConflictError {}
/** The sandbox is not in a state that allows this (e.g. stopped or paused). */
export class SandboxNotRunningError extends ConflictError {}
/** Another operation on the sandbox is in progress; retry when it has finished. */
export class SandboxBusyError extends ConflictError {}
/** The snapshot cannot be deleted: other snapshots or sandboxes depend on it. */
export class SnapshotInUseError extends ConflictError {}
/** A diff snapshot's base snapshot is gone. */
export class SnapshotBaseMissingError extends ConflictError {}
/** A diff snapshot's base is not the one it was taken against any more. */
export class SnapshotBaseChangedError extends ConflictError {}
/** The snapshot was restored before; pass `force: true` to restore it again. */
export class SnapshotAlreadyRestoredError extends ConflictError {}
/** A resume asked for resources the snapshot's machine cannot take (less memory, more vCPUs). */
export class ResourceOverrideRefusedError extends ConflictError {}
/** The host port is taken (or the guest port is already published). */
export class PortInUseError extends ConflictError {}
/** The guest path exists with another kind (e.g. a file where a directory is needed). */
export class GuestPathConflictError extends ConflictError {}
/** The sandbox's guest agent is too old for the request: rebuild its image. */
export class AgentOutdatedError extends ConflictError {}
/** The snapshot's files fail their checks (422); it cannot be used. */
export class SnapshotCorruptError extends KilnError {}
/** The guest could not start the command (422 exec_failed): no such program, not executable; fix the command. */
export class ExecFailedError extends KilnError {}
/** The snapshot cannot run here, e.g. taken with another QEMU, CPU model or accelerator (422). */
export class SnapshotIncompatibleError extends KilnError {}
/** The daemon's sandbox count or memory limit is reached (429). */
export class CapacityExceededError extends CapacityError {}
/** This client sent too many requests (429, `kiln serve --rate-limit`). */
export class RateLimitedError extends CapacityError {}
/** The VM did not boot or its agent did not answer in time. */
export class BootFailedError extends ServerError {}
/** QEMU failed or exited. */
export class VmFailedError extends ServerError {}
/** The operation was cut off (e.g. by a daemon restart) and rolled back. */
export class OperationInterruptedError extends ServerError {}
/** An unexpected daemon error; its log has details. */
export class InternalError extends ServerError {}
/** The guest agent does not answer (502). */
export class AgentUnavailableError extends ServerError {}
/** The guest agent reported a failure (502). */
export class GuestError extends ServerError {}
/** The VM stopped answering QEMU's monitor in time (503). */
export class SandboxUnresponsiveError extends ServerError {}
/** The host's disk is too full for the operation (507). */
export class InsufficientStorageError extends ServerError {}
/** The guest's disk is full (507). */
export class GuestDiskFullError extends ServerError {}
/** No remote by that name (404). */
export class RemoteNotFoundError extends NotFoundError {}
/** A remote by that name exists already (409). */
export class RemoteAlreadyExistsError extends ConflictError {}
/** The remote's object storage did not answer or refused (502). */
export class RemoteUnavailableError extends ServerError {}
/** Sandboxes made from the image exist, so it cannot be removed (409). */
export class ImageInUseError extends ConflictError {}
/** No image builder (buildah or docker) is installed for a Dockerfile build (501). */
export class ImageBuilderMissingError extends ServerError {}

/** The daemon's documented error codes and their HTTP statuses (docs/api.md). */
export const STATUS_BY_CODE: Readonly<Record<string, number>> = {
  invalid_request: 400,
  path_escape: 400,
  unauthorized: 401,
  guest_permission_denied: 403,
  process_not_found: 404,
  sandbox_not_found: 404,
  snapshot_not_found: 404,
  image_not_found: 404,
  guest_path_not_found: 404,
  volume_not_found: 404,
  operation_not_found: 404,
  route_not_found: 404,
  sandbox_name_taken: 409,
  snapshot_already_exists: 409,
  sandbox_not_running: 409,
  snapshot_in_use: 409,
  snapshot_already_restored: 409,
  snapshot_base_missing: 409,
  snapshot_base_changed: 409,
  sandbox_busy: 409,
  volume_already_exists: 409,
  volume_in_use: 409,
  resource_override_refused: 409,
  port_in_use: 409,
  guest_path_conflict: 409,
  agent_outdated: 409,
  port_not_found: 404,
  snapshot_corrupt: 422,
  exec_failed: 422,
  snapshot_incompatible: 422,
  method_not_allowed: 405,
  payload_too_large: 413,
  capacity_exceeded: 429,
  rate_limited: 429,
  boot_failed: 500,
  vm_failed: 500,
  operation_interrupted: 500,
  internal: 500,
  agent_unavailable: 502,
  guest_error: 502,
  sandbox_unresponsive: 503,
  timeout: 504,
  insufficient_storage: 507,
  guest_disk_full: 507,
  remote_not_found: 404,
  remote_already_exists: 409,
  remote_unavailable: 502,
  image_in_use: 409,
  image_builder_missing: 501,
};

type ErrorClass = new (message: string, code?: string, status?: number) => KilnError;

/** The class of each code the daemon can return. */
export const BY_CODE: Readonly<Record<string, ErrorClass>> = {
  invalid_request: InvalidRequestError,
  unauthorized: AuthenticationError,
  guest_permission_denied: GuestPermissionDeniedError,
  sandbox_not_found: SandboxNotFoundError,
  snapshot_not_found: SnapshotNotFoundError,
  image_not_found: ImageNotFoundError,
  guest_path_not_found: GuestPathNotFoundError,
  volume_not_found: VolumeNotFoundError,
  operation_not_found: OperationNotFoundError,
  port_not_found: PortNotFoundError,
  process_not_found: ProcessNotFoundError,
  route_not_found: RouteNotFoundError,
  method_not_allowed: MethodNotAllowedError,
  payload_too_large: PayloadTooLargeError,
  sandbox_name_taken: SandboxNameTakenError,
  sandbox_not_running: SandboxNotRunningError,
  sandbox_busy: SandboxBusyError,
  snapshot_already_exists: SnapshotAlreadyExistsError,
  snapshot_in_use: SnapshotInUseError,
  snapshot_base_missing: SnapshotBaseMissingError,
  snapshot_base_changed: SnapshotBaseChangedError,
  snapshot_already_restored: SnapshotAlreadyRestoredError,
  volume_already_exists: VolumeAlreadyExistsError,
  volume_in_use: VolumeInUseError,
  resource_override_refused: ResourceOverrideRefusedError,
  port_in_use: PortInUseError,
  guest_path_conflict: GuestPathConflictError,
  agent_outdated: AgentOutdatedError,
  snapshot_corrupt: SnapshotCorruptError,
  exec_failed: ExecFailedError,
  snapshot_incompatible: SnapshotIncompatibleError,
  capacity_exceeded: CapacityExceededError,
  rate_limited: RateLimitedError,
  boot_failed: BootFailedError,
  vm_failed: VmFailedError,
  operation_interrupted: OperationInterruptedError,
  internal: InternalError,
  agent_unavailable: AgentUnavailableError,
  guest_error: GuestError,
  sandbox_unresponsive: SandboxUnresponsiveError,
  timeout: TimeoutError,
  insufficient_storage: InsufficientStorageError,
  guest_disk_full: GuestDiskFullError,
  path_escape: PathEscapeError,
  remote_not_found: RemoteNotFoundError,
  remote_already_exists: RemoteAlreadyExistsError,
  remote_unavailable: RemoteUnavailableError,
  image_in_use: ImageInUseError,
  image_builder_missing: ImageBuilderMissingError,
};

const BY_STATUS: Record<number, ErrorClass> = {
  400: InvalidRequestError,
  401: AuthenticationError,
  404: NotFoundError,
  409: ConflictError,
  429: CapacityError,
  500: ServerError,
  501: ServerError,
  502: ServerError,
  503: ServerError,
  504: TimeoutError,
  507: ServerError,
};

/** The error for a response with status `status` and body text `text`. */
export function errorFromResponse(status: number, text: string, retryAfter?: number): KilnError {
  let code = `http_${status}`;
  let message = text.trim() || `HTTP ${status}`;
  try {
    const detail = (JSON.parse(text) as { error?: { code?: unknown; message?: unknown } }).error;
    if (detail && typeof detail.code === "string") {
      code = detail.code;
      message = typeof detail.message === "string" ? detail.message : code;
    }
  } catch {
    // Not kiln's error shape (e.g. a proxy in between): keep the text.
  }
  const err = errorFromCode(code, message, status);
  err.retryAfter = retryAfter;
  return err;
}

/** The error for a code, e.g. from an `error` event of a streamed exec. */
export function errorFromCode(code: string, message: string, status = STATUS_BY_CODE[code] ?? 500): KilnError {
  const Cls = BY_CODE[code] ?? BY_STATUS[status] ?? KilnError;
  return new Cls(message, code, status);
}
