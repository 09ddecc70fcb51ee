// The few Node.js APIs this SDK uses, declared here so that `typescript` is the only dev dependency
// (no @types/node). Only what the sources call is declared; the public API exposes none of it.

interface Buffer extends Uint8Array {
  toString(encoding?: "utf8" | "base64"): string;
}
declare const Buffer: {
  from(data: string, encoding?: "utf8" | "base64"): Buffer;
  from(data: Uint8Array | ArrayLike<number>): Buffer;
  concat(list: readonly Uint8Array[]): Buffer;
};

declare class TextDecoder {
  constructor(label?: string, options?: { fatal?: boolean });
  decode(input?: Uint8Array, options?: { stream?: boolean }): string;
}

declare function setTimeout(callback: () => void, ms: number): unknown;

declare const process: {
  env: Record<string, string | undefined>;
  getuid?: () => number;
};

declare module "node:events" {
  export interface EventEmitter {
    on(event: string, listener: (...args: any[]) => void): this;
    once(event: string, listener: (...args: any[]) => void): this;
  }
}

declare module "node:stream" {
  import type { EventEmitter } from "node:events";
  export interface Readable extends EventEmitter, AsyncIterable<Buffer> {
    destroy(error?: Error): this;
    resume(): this;
  }
  export interface Writable extends EventEmitter {
    write(chunk: Uint8Array): boolean;
    end(chunk?: Uint8Array): this;
    destroy(error?: Error): this;
  }
}

declare module "node:stream/promises" {
  export function pipeline(source: AsyncIterable<Uint8Array>, destination: import("node:stream").Writable): Promise<void>;
}

declare module "node:http" {
  import type { Readable, Writable } from "node:stream";
  export interface AgentOptions {
    keepAlive?: boolean;
  }
  export class Agent {
    constructor(options?: AgentOptions);
    destroy(): void;
  }
  export interface RequestOptions {
    method?: string;
    path?: string;
    host?: string;
    hostname?: string;
    port?: number;
    socketPath?: string;
    headers?: Record<string, string | number>;
    agent?: Agent;
  }
  export interface IncomingMessage extends Readable {
    statusCode?: number;
    headers: Record<string, string | string[] | undefined>;
  }
  export interface ClientRequest extends Writable {
    setTimeout(ms: number, callback?: () => void): this;
  }
  export function request(options: RequestOptions, callback?: (res: IncomingMessage) => void): ClientRequest;
}

declare module "node:fs" {
  import type { Readable, Writable } from "node:stream";
  export function createReadStream(path: string): Readable;
  export function createWriteStream(path: string): Writable;
}

declare module "node:fs/promises" {
  export function stat(path: string): Promise<{ size: number }>;
}

declare module "node:os" {
  export function homedir(): string;
}

declare module "node:path" {
  export function join(...parts: string[]): string;
  export const posix: { join(...parts: string[]): string };
}
