import { sandboxPath } from "./client.js";
import { errorFromCode } from "./errors.js";
import type { Sandbox } from "./sandbox.js";

/** A background process in a sandbox (`sandbox.processes`). */
export interface ProcessInfo {
  /** The guest pid (also its process group id): the handle for the other calls. */
  pid: number;
  argv: string[];
  user: string | null;
  state: "running" | "exited";
  exitCode: number | null;
  signal: number | null;
  timedOut: boolean;
  outputBytes: number;
  /** Output pushed out of the process's 1 MiB ring, which later readers cannot see. */
  droppedBytes: number;
  startedUptimeMs: number;
}

export interface StartProcessOptions {
  env?: Record<string, string>;
  cwd?: string;
  /** Run as this guest user (name or uid) instead of root. */
  user?: string | number;
  /** Keep standard input open for `write()`. */
  stdin?: boolean;
  /** Kill it after this long. */
  timeoutMs?: number;
}

/** What `logs()` read: the output the ring still held (and, when following, everything after). */
export interface ProcessOutput {
  stdout: string;
  stderr: string;
  droppedBytes: number;
  exited: boolean;
  exitCode: number | null;
  signal: number | null;
}

export interface LogsOptions {
  /** Stream live output until the process exits. */
  follow?: boolean;
  onStdout?: (data: string) => void;
  onStderr?: (data: string) => void;
}

interface ProcessJson {
  pid: number;
  argv?: string[];
  user?: string | null;
  state: "running" | "exited";
  exit_code?: number | null;
  signal?: number | null;
  timed_out?: boolean;
  output_bytes?: number;
  dropped_bytes?: number;
  started_uptime_ms?: number;
}

function toInfo(d: ProcessJson): ProcessInfo {
  return {
    pid: d.pid,
    argv: d.argv ?? [],
    user: d.user ?? null,
    state: d.state,
    exitCode: d.exit_code ?? null,
    signal: d.signal ?? null,
    timedOut: d.timed_out ?? false,
    outputBytes: d.output_bytes ?? 0,
    droppedBytes: d.dropped_bytes ?? 0,
    startedUptimeMs: d.started_uptime_ms ?? 0,
  };
}

// The daemon takes at most this much per stdin write.
const STDIN_CHUNK = 256 * 1024;

/** Background processes: they outlive the client and are carried by snapshots, forks and stop/start. */
export class Processes {
  readonly #sandbox: Sandbox;

  constructor(sandbox: Sandbox) {
    this.#sandbox = sandbox;
  }

  #path(suffix = ""): string {
    return sandboxPath(this.#sandbox.id, "/processes" + suffix);
  }

  /** Starts `cmd` (a shell line, or an argv array) in the background and returns at once. */
  async start(cmd: string | string[], options: StartProcessOptions = {}): Promise<ProcessInfo> {
    const body: Record<string, unknown> = typeof cmd === "string" ? { cmd } : { argv: cmd };
    if (options.env) body.env = options.env;
    if (options.cwd !== undefined) body.cwd = options.cwd;
    if (options.user !== undefined) body.user = String(options.user);
    if (options.stdin) body.stdin = true;
    if (options.timeoutMs !== undefined) body.timeout_ms = Math.max(1, Math.round(options.timeoutMs));
    const res = await this.#sandbox.client.request("POST", this.#path(), { json: body });
    return toInfo(await res.json<ProcessJson>());
  }

  /** Running processes and recently finished ones (with their exit codes). */
  async list(): Promise<ProcessInfo[]> {
    const res = await this.#sandbox.client.request("GET", this.#path());
    return (await res.json<{ processes: ProcessJson[] }>()).processes.map(toInfo);
  }

  async get(pid: number): Promise<ProcessInfo> {
    const res = await this.#sandbox.client.request("GET", this.#path(`/${pid}`));
    return toInfo(await res.json<ProcessJson>());
  }

  /** The output its ring still holds, from the start; with `follow` also live output until it exits. */
  async logs(pid: number, options: LogsOptions = {}): Promise<ProcessOutput> {
    const res = await this.#sandbox.client.request("GET", this.#path(`/${pid}/logs`), {
      query: { follow: options.follow ? "true" : "false" },
      timeoutMs: null,
    });
    const out = { text: "", decoder: new TextDecoder("utf-8"), cb: options.onStdout };
    const err = { text: "", decoder: new TextDecoder("utf-8"), cb: options.onStderr };
    const result: ProcessOutput = { stdout: "", stderr: "", droppedBytes: 0, exited: false, exitCode: null, signal: null };
    const lines = new TextDecoder("utf-8");
    let pending = "";
    for await (const chunk of res.body) {
      pending += lines.decode(chunk, { stream: true });
      let nl: number;
      while ((nl = pending.indexOf("\n")) >= 0) {
        const line = pending.slice(0, nl).trim();
        pending = pending.slice(nl + 1);
        if (!line) continue;
        const ev = JSON.parse(line) as {
          type: string;
          data?: string | null;
          data_b64?: string | null;
          bytes?: number;
          exit_code?: number | null;
          signal?: number | null;
          code?: string;
          message?: string;
        };
        if (ev.type === "stdout" || ev.type === "stderr") {
          const s = ev.type === "stdout" ? out : err;
          const raw = ev.data != null ? Buffer.from(ev.data, "utf8") : Buffer.from(ev.data_b64 ?? "", "base64");
          const text = s.decoder.decode(raw, { stream: true });
          if (text) {
            s.text += text;
            s.cb?.(text);
          }
        } else if (ev.type === "dropped") {
          result.droppedBytes += ev.bytes ?? 0;
        } else if (ev.type === "exit") {
          result.exited = true;
          result.exitCode = ev.exit_code ?? null;
          result.signal = ev.signal ?? null;
        } else if (ev.type === "error") {
          throw errorFromCode(ev.code ?? "internal", ev.message ?? "the output stream failed");
        }
      }
    }
    result.stdout = out.text + out.decoder.decode();
    result.stderr = err.text + err.decoder.decode();
    return result;
  }

  /** Writes to its stdin (it must have been started with `stdin: true`); `close` then closes stdin. */
  async write(pid: number, data: string | Uint8Array = "", options: { close?: boolean } = {}): Promise<void> {
    const raw = typeof data === "string" ? Buffer.from(data, "utf8") : Buffer.from(data);
    const chunks: Buffer[] = [];
    for (let i = 0; i < raw.length; i += STDIN_CHUNK) chunks.push(raw.subarray(i, i + STDIN_CHUNK));
    if (chunks.length === 0) chunks.push(Buffer.from(new Uint8Array(0)));
    for (let i = 0; i < chunks.length; i++) {
      const close = (options.close ?? false) && i === chunks.length - 1;
      const res = await this.#sandbox.client.request("POST", this.#path(`/${pid}/stdin`), {
        json: { data_b64: chunks[i].toString("base64"), close },
      });
      await res.text();
    }
  }

  /** Sends `signal` (a name such as "TERM"/"KILL", or a number) to its process group. */
  async kill(pid: number, signal: string | number = "TERM"): Promise<void> {
    const res = await this.#sandbox.client.request("POST", this.#path(`/${pid}/signal`), { json: { signal } });
    await res.text();
  }

  /** Waits up to `timeoutMs` (default 30 s) for it to end; `state` says whether it did. */
  async wait(pid: number, options: { timeoutMs?: number } = {}): Promise<ProcessInfo> {
    const ms = Math.max(0, Math.round(options.timeoutMs ?? 30_000));
    const res = await this.#sandbox.client.request("POST", this.#path(`/${pid}/wait`), {
      query: { timeout_ms: String(ms) },
      timeoutMs: ms + 30_000,
      idempotent: true, // waiting changes nothing, so a 502/503 or broken connection is retried
    });
    return toInfo(await res.json<ProcessJson>());
  }
}
