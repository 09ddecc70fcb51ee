// The few Node.js APIs this SDK uses, declared here so that `typescript` is the only dev dependency
// (no @types/node). Only what the sources call is declared; the public API exposes none of it.

interface Buffer extends Uint8Array {
  toString(encoding?: "utf8" | "base64", start?: number, end?: number): string;
  write(s: string, offset: number, length: number, encoding: "utf8" | "ascii"): number;
  subarray(start?: number, end?: number): Buffer;
  indexOf(value: number, byteOffset?: number): number;
  fill(value: string | number, start?: number, end?: number): this;
}
declare const Buffer: {
  from(data: string, encoding?: "utf8" | "base64"): Buffer;
  from(data: Uint8Array | ArrayLike<number>): Buffer;
  concat(list: readonly Uint8Array[]): Buffer;
  alloc(size: number): Buffer;
  byteLength(s: string): number;
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
  export const constants: { O_WRONLY: number; O_CREAT: number; O_EXCL: number; O_NOFOLLOW: number };
  export function createReadStream(path: string): Readable;
  export function createWriteStream(path: string): Writable;
}

declare module "node:fs/promises" {
  export function stat(path: string): Promise<{ size: number }>;
  export function rename(from: string, to: string): Promise<void>;
  export interface Stats {
    size: number;
    mode: number;
    mtimeMs: number;
    isFile(): boolean;
    isDirectory(): boolean;
    isSymbolicLink(): boolean;
  }
  export interface FileHandle {
    read(buf: Uint8Array, offset: number, length: number, position: number | null): Promise<{ bytesRead: number }>;
    write(buf: Uint8Array): Promise<{ bytesWritten: number }>;
    close(): Promise<void>;
  }
  export function lstat(path: string): Promise<Stats>;
  export function mkdir(path: string, options?: { recursive?: boolean }): Promise<string | undefined>;
  export function open(path: string, flags: string | number, mode?: number): Promise<FileHandle>;
  export function readdir(path: string): Promise<string[]>;
  export function readlink(path: string): Promise<string>;
  export function chmod(path: string, mode: number): Promise<void>;
  export function symlink(target: string, path: string): Promise<void>;
  export function link(existing: string, path: string): Promise<void>;
  export function unlink(path: string): Promise<void>;
  export function utimes(path: string, atime: number, mtime: number): Promise<void>;
  export function lutimes(path: string, atime: number, mtime: number): Promise<void>;
  export function mkdtemp(prefix: string): Promise<string>;
  export function rm(path: string, options?: { recursive?: boolean; force?: boolean }): Promise<void>;
}

declare module "node:os" {
  export function homedir(): string;
}

declare module "node:path" {
  export function join(...parts: string[]): string;
  export function resolve(...parts: string[]): string;
  export const sep: string;
  export const posix: { join(...parts: string[]): string };
}
