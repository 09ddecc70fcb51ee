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
/** The daemon's sandbox count or memory limit is reached (429). */
export class CapacityError extends KilnError {}
/** A boot or command took too long on the server (504), or the client gave up waiting. */
export class TimeoutError extends KilnError {}

/** The daemon's documented error codes and their HTTP statuses (docs/api.md). */
export const STATUS_BY_CODE: Readonly<Record<string, number>> = {
  invalid_request: 400,
  path_escape: 400,
  unauthorized: 401,
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
  port_not_found: 404,
  snapshot_corrupt: 422,
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
};

type ErrorClass = new (message: string, code?: string, status?: number) => KilnError;

const BY_CODE: Record<string, ErrorClass> = {
  sandbox_not_found: SandboxNotFoundError,
  snapshot_not_found: SnapshotNotFoundError,
  guest_path_not_found: GuestPathNotFoundError,
  snapshot_already_exists: SnapshotAlreadyExistsError,
  volume_not_found: VolumeNotFoundError,
  volume_already_exists: VolumeAlreadyExistsError,
  volume_in_use: VolumeInUseError,
  path_escape: PathEscapeError,
};

const BY_STATUS: Record<number, ErrorClass> = {
  400: InvalidRequestError,
  401: AuthenticationError,
  404: NotFoundError,
  409: ConflictError,
  429: CapacityError,
  504: TimeoutError,
};

/** The error for a response with status `status` and body text `text`. */
export function errorFromResponse(status: number, text: string): KilnError {
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
  return errorFromCode(code, message, status);
}

/** The error for a code, e.g. from an `error` event of a streamed exec. */
export function errorFromCode(code: string, message: string, status = STATUS_BY_CODE[code] ?? 500): KilnError {
  const Cls = BY_CODE[code] ?? BY_STATUS[status] ?? KilnError;
  return new Cls(message, code, status);
}
