import * as http from "node:http";
import { homedir } from "node:os";
import { join } from "node:path";
import type { Readable } from "node:stream";

import { KilnConnectionError, KilnError, TimeoutError, errorFromResponse } from "./errors.js";

/** Where the daemon is. With nothing given, the environment decides (see {@link Client}). */
export interface ClientOptions {
  /** Path of the daemon's unix socket. */
  socket?: string;
  /** `HOST:PORT` or `http://HOST:PORT` of a daemon started with `--listen`. */
  url?: string;
  /** Bearer token for `url` (default `$KILN_TOKEN`). */
  token?: string;
  /** Milliseconds to wait for a response (default 300 000: a cold boot answers once the guest is up). */
  timeoutMs?: number;
  /** When to send a request again by itself (see {@link RetryPolicy}); `{ maxAttempts: 1 }` never. */
  retry?: Partial<RetryPolicy>;
}

/**
 * When the client sends a request again by itself. Retried: a 429 (`rate_limited`, `capacity_exceeded`: the
 * daemon refused before doing anything) for every method, honouring `Retry-After`; a 502/503 or a broken
 * connection only for idempotent requests (GET, HEAD, PUT, DELETE, or `idempotent: true`; a streamed body is
 * never sent twice); a connection that could not be opened (nothing was sent) for every method. A POST that
 * got any other error response is never retried. Waits grow exponentially with jitter (a random 50-100 % of
 * `backoffMs * 2^n`, at most `maxBackoffMs`); a `Retry-After` is waited out as given.
 */
export interface RetryPolicy {
  /** Tries in all, the first included (1 turns retries off). Default 4. */
  maxAttempts: number;
  /** Milliseconds before the first retry (before jitter). Default 250. */
  backoffMs: number;
  /** The longest wait between two tries unless the daemon's `Retry-After` says more. Default 8 000. */
  maxBackoffMs: number;
  /** No new try starts this long after the first; a `Retry-After` ending beyond it fails at once. Default 30 000. */
  maxElapsedMs: number;
}

export const DEFAULT_RETRY: Readonly<RetryPolicy> = { maxAttempts: 4, backoffMs: 250, maxBackoffMs: 8_000, maxElapsedMs: 30_000 };

const IDEMPOTENT_METHODS = new Set(["GET", "HEAD", "OPTIONS", "PUT", "DELETE"]);
// Transport errors where the connection was never opened, so the daemon cannot have seen the request.
const NOT_SENT = new Set(["ECONNREFUSED", "ENOENT", "EAI_AGAIN"]);

/** A `Retry-After` header (seconds, or an HTTP date) in seconds from now. */
export function retryAfterSeconds(value: string | string[] | undefined): number | undefined {
  const v = (Array.isArray(value) ? value[0] : value)?.trim();
  if (!v) return undefined;
  if (/^\d+$/.test(v)) return Number(v);
  const when = Date.parse(v);
  return Number.isNaN(when) ? undefined : Math.max(0, (when - Date.now()) / 1000);
}

/** Options every operation that talks to the daemon accepts. */
export interface WithClient {
  /** The daemon to use instead of {@link defaultClient}. */
  client?: Client;
}

type Query = Record<string, string | number | boolean | undefined> | [string, string][];

export interface RequestOptions {
  json?: unknown;
  query?: Query;
  body?: Uint8Array | AsyncIterable<Uint8Array>;
  headers?: Record<string, string | number>;
  /** `null`: wait as long as it takes; `undefined`: the client's timeout. */
  timeoutMs?: number | null;
  /** Overrides the method's default for retries of 502/503 and broken connections (see {@link RetryPolicy}). */
  idempotent?: boolean;
}

/** A response whose status was checked: read its body with `text()`/`json()` or iterate `body`. */
export interface Response {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: AsyncIterable<Uint8Array>;
  text(): Promise<string>;
  json<T>(): Promise<T>;
  bytes(): Promise<Uint8Array>;
}

/**
 * kiln's data directory as the daemon chooses it: `$KILN_DATA_DIR`, else `/var/lib/kiln` for root, else
 * `$XDG_DATA_HOME/kiln` or `~/.local/share/kiln`.
 */
export function defaultDataDir(): string {
  const env = process.env;
  if (env.KILN_DATA_DIR) return env.KILN_DATA_DIR;
  if (process.getuid?.() === 0) return "/var/lib/kiln";
  if (env.XDG_DATA_HOME) return join(env.XDG_DATA_HOME, "kiln");
  return join(homedir(), ".local/share/kiln");
}

/** The daemon's socket when nothing is configured: `kiln.sock` in the data directory. */
export function defaultSocket(): string {
  return join(defaultDataDir(), "kiln.sock");
}

/**
 * A connection to a kiln daemon over its unix socket, or over TCP with a bearer token.
 *
 * With no options: `KILN_URL` (TCP, with `KILN_TOKEN`) if set, else the socket `KILN_SOCKET`, else
 * {@link defaultSocket}. Explicit options win over the environment.
 */
export class Client {
  readonly socket: string | undefined;
  readonly url: string | undefined;
  readonly timeoutMs: number;
  readonly retry: Readonly<RetryPolicy>;
  readonly #host: string;
  readonly #port: number | undefined;
  readonly #headers: Record<string, string> = { "user-agent": "kiln-typescript" };
  // Idle keep-alive sockets are unref'd by Node, so they never keep a process alive.
  readonly #agent = new http.Agent({ keepAlive: true });

  constructor(options: ClientOptions = {}) {
    if (options.socket !== undefined && options.url !== undefined) {
      throw new TypeError("give either socket or url, not both");
    }
    let { socket, url } = options;
    if (socket === undefined && url === undefined) {
      url = process.env.KILN_URL || undefined;
      if (url === undefined) socket = process.env.KILN_SOCKET || defaultSocket();
    }
    this.timeoutMs = options.timeoutMs ?? 300_000;
    this.retry = { ...DEFAULT_RETRY, ...options.retry };
    this.socket = socket;
    this.#host = "kiln";
    if (url !== undefined) {
      this.url = url.includes("://") ? url : `http://${url}`;
      const m = /^https?:\/\/([^/:]+|\[[^\]]+\])(?::(\d+))?\/?$/.exec(this.url);
      if (!m) throw new TypeError(`cannot parse kiln url ${JSON.stringify(url)}: expected HOST:PORT`);
      this.#host = m[1]!.replace(/^\[|\]$/g, "");
      this.#port = m[2] ? Number(m[2]) : 80;
      const token = options.token ?? process.env.KILN_TOKEN;
      if (token) this.#headers.authorization = `Bearer ${token}`;
    }
  }

  /** The daemon's address, for messages. */
  get where(): string {
    return this.url ? `url ${this.url}` : `socket ${this.socket}`;
  }

  /** Closes idle connections (not needed before exiting). */
  close(): void {
    this.#agent.destroy();
  }

  /**
   * Sends a request, retrying as {@link Client.retry} allows; rejects with a {@link KilnError} for error
   * statuses and transport failures.
   */
  async request(method: string, path: string, options: RequestOptions = {}): Promise<Response> {
    const p = this.retry;
    const replayable = !(options.body !== undefined && !(options.body instanceof Uint8Array));
    const idempotent = replayable && (options.idempotent ?? IDEMPOTENT_METHODS.has(method.toUpperCase()));
    const started = Date.now();
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.#requestOnce(method, path, options);
      } catch (e) {
        if (!(e instanceof KilnError) || attempt >= p.maxAttempts) throw e;
        let retry: boolean;
        if (e.status !== undefined) {
          retry = e.status === 429 || ((e.status === 502 || e.status === 503) && idempotent);
        } else {
          const sysCode = ((e.cause ?? {}) as { code?: string }).code;
          retry = e.code === "connection_failed" && (idempotent || (sysCode !== undefined && NOT_SENT.has(sysCode)));
        }
        if (!retry) throw e;
        const cap = Math.min(p.maxBackoffMs, p.backoffMs * 2 ** (attempt - 1));
        const delay =
          e.retryAfter !== undefined ? e.retryAfter * 1000 + Math.random() * p.backoffMs : cap / 2 + (Math.random() * cap) / 2;
        if (Date.now() - started + delay > p.maxElapsedMs) throw e;
        await new Promise<void>((resolve) => setTimeout(() => resolve(), delay));
      }
    }
  }

  #requestOnce(method: string, path: string, options: RequestOptions): Promise<Response> {
    const headers: Record<string, string | number> = { ...this.#headers, ...options.headers };
    let payload: Uint8Array | AsyncIterable<Uint8Array> | undefined = options.body;
    if (options.json !== undefined) {
      payload = Buffer.from(JSON.stringify(options.json));
      headers["content-type"] = "application/json";
    }
    if (payload instanceof Uint8Array) headers["content-length"] = payload.byteLength;
    else if (payload === undefined) headers["content-length"] = 0;

    const timeoutMs = options.timeoutMs === undefined ? this.timeoutMs : options.timeoutMs;
    const target = this.socket !== undefined ? { socketPath: this.socket } : { host: this.#host, port: this.#port };
    return new Promise<Response>((resolve, reject) => {
      const req = http.request(
        { method, path: path + queryString(options.query), headers, agent: this.#agent, ...target },
        (res) => {
          const status = res.statusCode ?? 0;
          if (status >= 400) {
            const retryAfter = retryAfterSeconds(res.headers["retry-after"]);
            readAll(res).then((b) => reject(errorFromResponse(status, Buffer.from(b).toString("utf8"), retryAfter)), reject);
            return;
          }
          resolve(wrapResponse(res, status, this.where));
        },
      );
      req.on("error", (e: Error) => reject(this.#transportError(e)));
      if (timeoutMs !== null) {
        // Fires when the socket is idle that long, i.e. also in the middle of a slow body.
        req.setTimeout(timeoutMs, () =>
          req.destroy(new TimeoutError(`no answer from the kiln daemon at ${this.where} within ${timeoutMs} ms`, "client_timeout")),
        );
      }
      if (payload instanceof Uint8Array) {
        req.end(payload);
      } else if (payload === undefined) {
        req.end();
      } else {
        pump(payload, req).catch((e: unknown) => req.destroy(e instanceof Error ? e : new Error(String(e))));
      }
    });
  }

  /** Sends a request and parses its JSON answer. */
  async json<T>(method: string, path: string, options: RequestOptions = {}): Promise<T> {
    return (await this.request(method, path, options)).json<T>();
  }

  #transportError(e: Error): KilnError {
    if (e instanceof KilnError) return e;
    const code = (e as { code?: string }).code;
    const hint =
      code === "ENOENT" || code === "ECONNREFUSED" ? " (is `kiln serve` running? set KILN_SOCKET or KILN_URL)" : "";
    return new KilnConnectionError(`cannot reach the kiln daemon at ${this.where}: ${e.message}${hint}`, "connection_failed", undefined, {
      cause: e,
    });
  }
}

function queryString(query: Query | undefined): string {
  if (!query) return "";
  const pairs = Array.isArray(query) ? query : Object.entries(query);
  const parts = pairs
    .filter(([, v]) => v !== undefined)
    .map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(String(v))}`);
  return parts.length ? `?${parts.join("&")}` : "";
}

async function pump(source: AsyncIterable<Uint8Array>, req: http.ClientRequest): Promise<void> {
  for await (const chunk of source) {
    if (!req.write(chunk)) await new Promise<void>((resolve) => req.once("drain", () => resolve()));
  }
  req.end();
}

async function readAll(stream: AsyncIterable<Uint8Array>): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  for await (const c of stream) chunks.push(c);
  return Buffer.concat(chunks);
}

function wrapResponse(res: http.IncomingMessage, status: number, where: string): Response {
  // A body cut short (the daemon died or closed the connection) surfaces as a KilnConnectionError.
  const body: AsyncIterable<Uint8Array> = {
    async *[Symbol.asyncIterator]() {
      try {
        yield* res as Readable;
      } catch (e) {
        if (e instanceof KilnError) throw e;
        throw new KilnConnectionError(`connection to the kiln daemon at ${where} broke: ${(e as Error).message}`, "connection_failed", undefined, {
          cause: e,
        });
      }
    },
  };
  return {
    status,
    headers: res.headers,
    body,
    bytes: () => readAll(body),
    text: async () => Buffer.from(await readAll(body)).toString("utf8"),
    json: async <T>() => {
      const text = Buffer.from(await readAll(body)).toString("utf8");
      return (text ? JSON.parse(text) : undefined) as T;
    },
  };
}

let defaultClientInstance: Client | undefined;

/** The client used when no `client` option is passed, made from the environment on first use. */
export function defaultClient(): Client {
  defaultClientInstance ??= new Client();
  return defaultClientInstance;
}

/** Replaces the default client (`undefined`: build a new one from the environment on next use). */
export function setDefaultClient(client: Client | undefined): void {
  defaultClientInstance = client;
}

export function sandboxPath(id: string, suffix = ""): string {
  return `/v1/sandboxes/${encodeURIComponent(id)}${suffix}`;
}

export function snapshotPath(id: string, suffix = ""): string {
  return `/v1/snapshots/${encodeURIComponent(id)}${suffix}`;
}

export function volumePath(name: string): string {
  return `/v1/volumes/${encodeURIComponent(name)}`;
}
