// Retries, against a small scripted HTTP server on loopback that answers 429/502/503 (or drops the
// connection) before answering 200: a test of the client's behaviour, so the server is a stand-in. The
// real daemon's 429 is tested at the end.
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { after, before, test } from "node:test";

import {
  AgentUnavailableError,
  CapacityError,
  Client,
  ConflictError,
  KilnConnectionError,
  KilnError,
  RateLimitedError,
  Sandbox,
  SandboxUnresponsiveError,
  Volume,
} from "../dist/index.js";
import { Daemon } from "./daemon.mjs";

const SANDBOX = { id: "sb1", name: "sb1", state: "running", template: "tiny", created_at: "2026-01-01T00:00:00Z" };
const FAST = { maxAttempts: 4, backoffMs: 50, maxBackoffMs: 200, maxElapsedMs: 10_000 };
const err = (status, code, headers = {}) => [status, headers, { error: { code, message: `${code} (scripted)` } }];

let server;
let port;
const script = new Map();
const seen = [];

before(async () => {
  server = createServer((req, res) => {
    const path = req.url.split("?")[0];
    req.resume();
    req.on("end", () => {
      seen.push([req.method, path, Date.now()]);
      const replies = script.get(`${req.method} ${path}`) ?? [err(404, "route_not_found")];
      const reply = replies.length > 1 ? replies.shift() : replies[0];
      if (reply === "drop") {
        req.socket.destroy();
        return;
      }
      const [status, headers, body] = reply;
      const raw = Buffer.from(body === null ? "" : JSON.stringify(body));
      res.writeHead(status, { "content-type": "application/json", "content-length": raw.length, ...headers });
      res.end(raw);
    });
  });
  await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
  port = server.address().port;
});

after(() => server.close());

const client = (retry = FAST) => new Client({ url: `127.0.0.1:${port}`, retry, timeoutMs: 10_000 });
const count = (method, path) => seen.filter(([m, p]) => m === method && p === path).length;

test("a 429 is retried after Retry-After, for GET and POST alike", async () => {
  script.set("GET /v1/sandboxes", [err(429, "rate_limited", { "retry-after": "1" }), [200, {}, [SANDBOX]]]);
  const t0 = Date.now();
  assert.deepEqual((await Sandbox.list({ client: client() })).map((s) => s.id), ["sb1"]);
  assert.ok(Date.now() - t0 >= 1000, "Retry-After: 1 was not waited out");
  assert.equal(count("GET", "/v1/sandboxes"), 2);
  // A 429 means the daemon refused before doing anything, so even a create (POST) is sent again.
  script.set("POST /v1/sandboxes", [err(429, "capacity_exceeded", { "retry-after": "0" }), [201, {}, SANDBOX]]);
  assert.equal((await Sandbox.create({ client: client() })).id, "sb1");
  assert.equal(count("POST", "/v1/sandboxes"), 2);
});

test("idempotent calls retry 502/503 with jittered exponential backoff", async () => {
  script.set("GET /v1/sandboxes/sb1", [err(502, "agent_unavailable"), err(503, "sandbox_unresponsive"), err(503, "sandbox_unresponsive"), [200, {}, SANDBOX]]);
  assert.equal((await Sandbox.connect("sb1", { client: client() })).id, "sb1");
  const times = seen.filter(([, p]) => p === "/v1/sandboxes/sb1").map(([, , t]) => t);
  assert.equal(times.length, 4);
  [50, 100, 200].forEach((cap, i) => {
    const gap = times[i + 1] - times[i];
    assert.ok(gap >= cap / 2 - 10 && gap <= cap + 250, `gap ${i}: ${gap} ms`);
  });
  script.set("DELETE /v1/sandboxes/sb1", [err(503, "sandbox_unresponsive"), [204, {}, null]]);
  const sb = await Sandbox.connect("sb1", { client: client() });
  await sb.delete();
  assert.equal(count("DELETE", "/v1/sandboxes/sb1"), 2);
});

test("a POST is never retried on an error response or a broken connection", async () => {
  script.set("GET /v1/sandboxes/sb2", [[200, {}, { ...SANDBOX, id: "sb2" }]]);
  const sb = await Sandbox.connect("sb2", { client: client() });
  script.set("POST /v1/sandboxes/sb2/snapshots", [err(503, "sandbox_unresponsive"), [201, {}, {}]]);
  await assert.rejects(sb.snapshot({ name: "s" }), (e) => e instanceof SandboxUnresponsiveError && e.status === 503);
  assert.equal(count("POST", "/v1/sandboxes/sb2/snapshots"), 1);
  script.set("POST /v1/sandboxes/sb2/stop", ["drop", [200, {}, SANDBOX]]);
  await assert.rejects(sb.stop(), KilnConnectionError);
  assert.equal(count("POST", "/v1/sandboxes/sb2/stop"), 1);
});

test("broken connections are retried for idempotent calls", async () => {
  script.set("GET /v1/volumes", ["drop", "drop", [200, {}, []]]);
  assert.deepEqual(await Volume.list({ client: client() }), []);
  assert.equal(count("GET", "/v1/volumes"), 3);
});

test("retries are bounded by attempts and by time, and can be turned off", async () => {
  script.set("GET /v1/snapshots", [err(503, "sandbox_unresponsive")]);
  const before = count("GET", "/v1/snapshots");
  await assert.rejects(client().json("GET", "/v1/snapshots"), SandboxUnresponsiveError);
  assert.equal(count("GET", "/v1/snapshots") - before, FAST.maxAttempts);
  // A Retry-After beyond the time budget surfaces at once, carrying the daemon's advice.
  script.set("GET /v1/operations", [err(429, "rate_limited", { "retry-after": "60" })]);
  const t0 = Date.now();
  await assert.rejects(client().json("GET", "/v1/operations"), (e) => e instanceof RateLimitedError && e instanceof CapacityError && e.retryAfter === 60);
  assert.ok(Date.now() - t0 < 2000);
  assert.equal(count("GET", "/v1/operations"), 1);
  script.set("GET /v1/images", [err(429, "rate_limited", { "retry-after": "0" }), [200, {}, []]]);
  await assert.rejects(client({ maxAttempts: 1 }).json("GET", "/v1/images"), RateLimitedError);
  assert.equal(count("GET", "/v1/images"), 1);
});

test("unknown codes fall back to the class of their status, then to KilnError", async () => {
  script.set("GET /v1/sandboxes/sb3", [err(409, "brand_new_conflict")]);
  await assert.rejects(Sandbox.connect("sb3", { client: client() }), (e) => e.constructor === ConflictError && e.code === "brand_new_conflict");
  script.set("GET /v1/teapot", [err(418, "teapot")]);
  await assert.rejects(client().json("GET", "/v1/teapot"), (e) => e.constructor === KilnError && e.status === 418 && e.code === "teapot");
  script.set("POST /v1/sandboxes/sb1/fork", [err(502, "agent_unavailable"), [201, {}, { sandboxes: [] }]]);
  await assert.rejects(client().json("POST", "/v1/sandboxes/sb1/fork", { json: { count: 1 } }), AgentUnavailableError);
  assert.equal(count("POST", "/v1/sandboxes/sb1/fork"), 1);
});

test("against the daemon: its rate limit answers 429 rate_limited with Retry-After, and the client waits", async () => {
  const d = await Daemon.start("--rate-limit", "1", "--rate-burst", "1");
  try {
    const quiet = new Client({ socket: d.socket, retry: { maxAttempts: 1 } });
    await Sandbox.list({ client: quiet });
    await assert.rejects(Sandbox.list({ client: quiet }), (e) => e instanceof RateLimitedError && e.status === 429 && e.retryAfter >= 1);
    const patient = new Client({ socket: d.socket });
    const t0 = Date.now();
    for (let i = 0; i < 3; i++) assert.deepEqual(await Sandbox.list({ client: patient }), []);
    assert.ok(Date.now() - t0 >= 2000, "three calls at one per second after an empty bucket take about 3 s");
  } finally {
    d.stop();
  }
});
