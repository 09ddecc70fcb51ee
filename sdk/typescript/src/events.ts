import { type WithClient, defaultClient } from "./client.js";

/** One committed change of a sandbox, snapshot, volume or operation (docs/observability.md). */
export interface KilnEvent {
  /** Increases by one per event from 1 at daemon start; pass it as `since` to resume after it. */
  seq: number;
  time: string;
  /**
   * `sandbox.created`, `sandbox.state`, `sandbox.deleted`, `snapshot.created`, `snapshot.deleted`,
   * `volume.created`, `volume.deleted`, `operation.started`, `operation.finished`, or `events.gap` (events
   * were missed: `object` says which and why).
   */
  kind: string;
  id: string;
  sandbox: string | null;
  state: string | null;
  /** The API object after the change; `null` once deleted. */
  object: Record<string, unknown> | null;
}

export interface EventsOptions extends WithClient {
  /** Kinds or prefixes such as `"sandbox."`. */
  kinds?: string | string[];
  /** Only events about this sandbox (id or name). */
  sandbox?: string;
  /** Replay the events after this `seq` first (`0`: all the daemon keeps). */
  since?: number;
}

/**
 * The daemon's events as they happen: `for await (const e of events({ kinds: ["sandbox."] }))`. The stream
 * stays open until the loop ends (`break`) or the daemon closes it.
 */
export async function* events(options: EventsOptions = {}): AsyncGenerator<KilnEvent> {
  const client = options.client ?? defaultClient();
  const kinds = Array.isArray(options.kinds) ? options.kinds.join(",") : options.kinds;
  const res = await client.request("GET", "/v1/events", {
    query: { kind: kinds || undefined, sandbox: options.sandbox, since: options.since },
    headers: { accept: "text/event-stream" },
    timeoutMs: null,
  });
  yield* sseEvents(res.body);
}

/** Splits a server-sent-events byte stream into parsed events (comments such as heartbeats skipped). */
export async function* sseEvents(body: AsyncIterable<Uint8Array>): AsyncGenerator<KilnEvent> {
  const dec = new TextDecoder("utf-8");
  let pending = "";
  let data: string[] = [];
  for await (const chunk of body) {
    pending += dec.decode(chunk, { stream: true });
    let nl: number;
    while ((nl = pending.indexOf("\n")) >= 0) {
      const line = pending.slice(0, nl).replace(/\r$/, "");
      pending = pending.slice(nl + 1);
      if (line === "") {
        if (data.length) yield JSON.parse(data.join("\n")) as KilnEvent;
        data = [];
      } else if (line.startsWith("data:")) {
        data.push(line.slice(5).replace(/^ /, ""));
      }
    }
  }
}
