// Every error code the daemon can return maps to its own error class with the right status. The codes are
// read from the daemon's source (crates/kiln-core/src/error.rs and the HTTP layer's own in
// crates/kiln-server/src), so a code added there without a class here fails this test.
import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import * as kiln from "../dist/index.js";

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
const HTTP_STATUS = { UNAUTHORIZED: 401, NOT_FOUND: 404, METHOD_NOT_ALLOWED: 405, PAYLOAD_TOO_LARGE: 413, TOO_MANY_REQUESTS: 429 };

function rustFiles(dir) {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? rustFiles(join(dir, e.name)) : e.name.endsWith(".rs") ? [join(dir, e.name)] : [],
  );
}

/** code -> HTTP status, as the daemon's source defines them. */
function daemonCodes() {
  const src = readFileSync(join(REPO, "crates/kiln-core/src/error.rs"), "utf8");
  const names = Object.fromEntries([...src.matchAll(/ErrorCode::(\w+) => "([a-z_]+)"/g)].map((m) => [m[1], m[2]]));
  let body = src.slice(src.indexOf("fn http_status"));
  body = body.slice(0, body.indexOf("\n    }\n"));
  const codes = {};
  for (const [, arm, status] of body.matchAll(/((?:\s*\|?\s*ErrorCode::\w+)+)\s*=>\s*(\d{3})/g)) {
    for (const [, variant] of arm.matchAll(/ErrorCode::(\w+)/g)) codes[names[variant]] = Number(status);
  }
  assert.deepEqual(Object.keys(codes).sort(), Object.values(names).sort(), "every ErrorCode needs an as_str and an http_status arm");
  for (const file of rustFiles(join(REPO, "crates/kiln-server/src"))) {
    for (const [, status, code] of readFileSync(file, "utf8").matchAll(/ApiError::new\(\s*[\w:]*StatusCode::(\w+),\s*"([a-z_]+)"/g)) {
      assert.ok(status in HTTP_STATUS, `${file}: add StatusCode::${status} to HTTP_STATUS in this test`);
      codes[code] = HTTP_STATUS[status];
    }
  }
  return codes;
}

test("the parser finds the daemon's codes", () => {
  const codes = daemonCodes();
  assert.ok(Object.keys(codes).length >= 40);
  assert.deepEqual([codes.process_not_found, codes.rate_limited, codes.route_not_found], [404, 429, 404]);
});

test("every daemon code has its own error class and status", () => {
  const codes = daemonCodes();
  const missing = Object.keys(codes).filter((c) => !(c in kiln.BY_CODE)).sort();
  assert.deepEqual(missing, [], "codes without an error class in src/errors.ts");
  const wrong = Object.entries(codes).filter(([c, s]) => kiln.STATUS_BY_CODE[c] !== s);
  assert.deepEqual(wrong, [], "STATUS_BY_CODE disagrees with the daemon");
  const classes = Object.keys(codes).map((c) => kiln.BY_CODE[c]);
  assert.equal(new Set(classes).size, classes.length, "two codes share a class");
  for (const [code, status] of Object.entries(codes)) {
    const fromBody = kiln.errorFromCode(code, "why", status);
    for (const e of [kiln.errorFromCode(code, "why"), fromBody]) {
      assert.equal(e.constructor, kiln.BY_CODE[code], code);
      assert.deepEqual([e.code, e.status, e.message, e.name], [code, status, "why", e.constructor.name]);
      assert.equal(kiln[e.constructor.name], e.constructor, `${e.constructor.name} is not exported`);
    }
  }
  assert.ok(new kiln.ResourceOverrideRefusedError("m") instanceof kiln.ConflictError);
  assert.ok(new kiln.ProcessNotFoundError("m") instanceof kiln.NotFoundError);
  assert.ok(new kiln.RateLimitedError("m") instanceof kiln.CapacityError);
});

test("unknown codes fall back to the class of their status, then to KilnError", () => {
  assert.equal(kiln.errorFromCode("gadget_not_found", "m", 404).constructor, kiln.NotFoundError);
  assert.equal(kiln.errorFromCode("brand_new", "m", 503).constructor, kiln.ServerError);
  const e = kiln.errorFromCode("teapot", "m", 418);
  assert.deepEqual([e.constructor, e.code, e.status], [kiln.KilnError, "teapot", 418]);
});
