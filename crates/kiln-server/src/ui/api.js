// The API client: the bearer token lives in sessionStorage (this tab only) and goes in the Authorization
// header, never in a URL. On the unix socket (a local proxy) no token is needed and none is asked for.
const KEY = "kiln.token";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function token() { return sessionStorage.getItem(KEY); }
export function setToken(t) { t ? sessionStorage.setItem(KEY, t) : sessionStorage.removeItem(KEY); }

function headers(extra) {
  const h = Object.assign({}, extra);
  const t = token();
  if (t) h["Authorization"] = "Bearer " + t;
  return h;
}

export async function api(method, path, body) {
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const res = await fetch(path, init);
  const text = await res.text();
  if (!res.ok) {
    let code = "http_" + res.status, msg = text || res.statusText;
    try { const e = JSON.parse(text).error; code = e.code; msg = e.message; } catch (_) { /* not JSON */ }
    throw new ApiError(res.status, code, msg);
  }
  const type = res.headers.get("content-type") || "";
  return type.includes("json") && text ? JSON.parse(text) : text;
}

// Calls onOpen once the stream of GET /v1/events is open (a quiet daemon may send no event for a long
// time), then onEvent for each server-sent event. Resolves false at once when the daemon has no event
// stream (404), so the caller polls instead; otherwise resolves true when the stream ends.
export async function subscribe(onOpen, onEvent, signal) {
  const res = await fetch("/v1/events", { headers: headers({ Accept: "text/event-stream" }), signal });
  if (res.status === 404) return false;
  if (!res.ok || !res.body) throw new ApiError(res.status, "events", "event stream refused: " + res.status);
  onOpen();
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return true;
    buf += value;
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = block.split("\n").filter(l => l.startsWith("data:")).map(l => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      try { onEvent(JSON.parse(data)); } catch (_) { onEvent({ kind: "unknown" }); }
    }
  }
}
