import { Client, type WithClient, defaultClient } from "./client.js";

export type OperationState = "running" | "succeeded" | "failed";

/** The daemon's record of an operation (`GET /v1/operations/{id}`). */
export interface OperationRecord {
  id: string;
  kind: string;
  target: string;
  resources: { sandboxes?: string[]; snapshots?: string[]; volumes?: string[] };
  state: OperationState;
  stage?: string | null;
  result?: unknown;
  error?: { code: string; message: string } | null;
  created_at: string;
  updated_at: string;
}

export interface ListOperationsOptions extends WithClient {
  /** Only operations on (or that created) this sandbox, snapshot or volume id, or sandbox name. */
  target?: string;
  state?: OperationState;
}

function operationPath(id: string, suffix = ""): string {
  return `/v1/operations/${encodeURIComponent(id)}${suffix}`;
}

/**
 * A mutating request (snapshot, stop, fork, ...) the daemon runs to its end even if its client went away.
 * Every SDK call waits for its operation already; use these to find the outcome of one whose client was cut
 * off: `Operation.list({ target: sandbox.id })`, `Operation.get(id)`, `Operation.wait(id)`.
 */
export class Operation {
  /** @internal */
  readonly client: Client;
  id!: string;
  /** What it does, e.g. `snapshot.create`, `sandbox.stop`. */
  kind!: string;
  /** The id of the sandbox, snapshot or volume the request named. */
  target!: string;
  /** Ids it works on and created. */
  resources!: { sandboxes: string[]; snapshots: string[]; volumes: string[] };
  state!: OperationState;
  /** Where a running operation is, at a few milestones. */
  stage?: string;
  /** The body a waiting client got on success. */
  result?: unknown;
  errorCode?: string;
  errorMessage?: string;
  createdAt!: Date;
  updatedAt!: Date;

  /** @internal Use {@link Operation.get}, {@link Operation.list} or {@link Operation.wait}. */
  constructor(r: OperationRecord, client: Client) {
    this.client = client;
    this.id = r.id;
    this.kind = r.kind;
    this.target = r.target;
    this.resources = {
      sandboxes: r.resources?.sandboxes ?? [],
      snapshots: r.resources?.snapshots ?? [],
      volumes: r.resources?.volumes ?? [],
    };
    this.state = r.state;
    this.stage = r.stage ?? undefined;
    this.result = r.result ?? undefined;
    this.errorCode = r.error?.code;
    this.errorMessage = r.error?.message;
    this.createdAt = new Date(r.created_at);
    this.updatedAt = new Date(r.updated_at);
  }

  get done(): boolean {
    return this.state !== "running";
  }

  /** An operation by id (rejects with a `NotFoundError`, code `operation_not_found`). */
  static async get(id: string, options: WithClient = {}): Promise<Operation> {
    const client = options.client ?? defaultClient();
    return new Operation(await client.json<OperationRecord>("GET", operationPath(id)), client);
  }

  /** Recent operations, newest first. */
  static async list(options: ListOperationsOptions = {}): Promise<Operation[]> {
    const client = options.client ?? defaultClient();
    const query = { target: options.target, state: options.state };
    const list = await client.json<OperationRecord[]>("GET", "/v1/operations", { query });
    return list.map((r) => new Operation(r, client));
  }

  /** Waits until the operation finished or `timeoutSeconds` passed (default 60); resolves to it as it is then. */
  static async wait(id: string, options: WithClient & { timeoutSeconds?: number } = {}): Promise<Operation> {
    const client = options.client ?? defaultClient();
    const secs = Math.max(0, Math.floor(options.timeoutSeconds ?? 60));
    const r = await client.json<OperationRecord>("GET", operationPath(id, "/wait"), {
      query: { timeout: secs },
      timeoutMs: (secs + 30) * 1000,
    });
    return new Operation(r, client);
  }
}
