//! The event stream (`GET /v1/events`): every committed change of a sandbox, snapshot, volume or operation,
//! numbered in the order it was published. The state database publishes them where it commits the change
//! (db.rs, snapshot/db.rs, volume/store.rs, operations.rs), so no handler can forget one. The newest
//! [`RING_SIZE`] are kept in memory for clients that reconnect (`Last-Event-ID`); numbering restarts with
//! the daemon.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use utoipa::ToSchema;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::{now_rfc3339, Sandbox};
use crate::snapshot::Snapshot;

/// Events kept for replay.
pub const RING_SIZE: usize = 4096;

/// Every kind an event can have (`events.gap` is sent to one client, never published).
pub const KINDS: &[&str] = &[
    "sandbox.created",
    "sandbox.state",
    "sandbox.deleted",
    "snapshot.created",
    "snapshot.deleted",
    "volume.created",
    "volume.deleted",
    "operation.started",
    "operation.finished",
];

/// Sent instead of events a client can no longer get: older than the ring, or dropped because the client
/// read too slowly. `object` says which sequence numbers were missed.
pub const GAP: &str = "events.gap";

/// One change.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Increases by one per event, from 1 at daemon start.
    pub seq: u64,
    /// When it was published (RFC 3339).
    pub time: String,
    /// One of `sandbox.created`, `sandbox.state`, `sandbox.deleted`, `snapshot.created`,
    /// `snapshot.deleted`, `volume.created`, `volume.deleted`, `operation.started`, `operation.finished`
    /// (or `events.gap`).
    pub kind: String,
    /// The id of the object that changed (a volume's name).
    pub id: String,
    /// The sandbox it concerns: the sandbox itself, a snapshot's source, an operation's first sandbox.
    pub sandbox: Option<String>,
    /// The new state, for sandboxes and operations.
    pub state: Option<String>,
    /// The API object after the change; null when it was deleted.
    #[schema(value_type = Object)]
    pub object: Option<serde_json::Value>,
}

/// Which events a client wants: kinds (exact, or a prefix ending in `.` such as `sandbox.`) and a sandbox.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    kinds: Vec<String>,
    sandbox: Option<String>,
}

impl Filter {
    /// `kinds` is a comma-separated list; unknown kinds are refused so that a typo does not silently match
    /// nothing.
    pub fn new(kinds: Option<&str>, sandbox: Option<String>) -> Result<Filter> {
        let mut list = Vec::new();
        for k in kinds.unwrap_or("").split(',').map(str::trim) {
            if k.is_empty() {
                continue;
            }
            let k = k.trim_end_matches('*');
            let known = KINDS
                .iter()
                .any(|known| *known == k || (k.ends_with('.') && known.starts_with(k)));
            if !known {
                return Err(Error::invalid(format!(
                    "unknown event kind '{k}'; use one of {} or a prefix such as 'sandbox.'",
                    KINDS.join(", ")
                )));
            }
            list.push(k.to_string());
        }
        Ok(Filter {
            kinds: list,
            sandbox,
        })
    }

    pub fn matches(&self, e: &Event) -> bool {
        if e.kind == GAP {
            return true;
        }
        let kind_ok = self.kinds.is_empty()
            || self
                .kinds
                .iter()
                .any(|k| *k == e.kind || (k.ends_with('.') && e.kind.starts_with(k.as_str())));
        kind_ok
            && self
                .sandbox
                .as_ref()
                .is_none_or(|s| e.sandbox.as_deref() == Some(s.as_str()))
    }
}

struct Ring {
    last: u64,
    events: VecDeque<Arc<Event>>,
}

/// Publishes events and hands them to subscribers.
pub struct Hub {
    ring: Mutex<Ring>,
    tx: broadcast::Sender<Arc<Event>>,
    /// Fills in what an API object has beyond its row (set once the engine exists).
    engine: OnceLock<Weak<Engine>>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            ring: Mutex::new(Ring {
                last: 0,
                events: VecDeque::with_capacity(RING_SIZE),
            }),
            tx: broadcast::channel(RING_SIZE).0,
            engine: OnceLock::new(),
        }
    }
}

/// What a new subscriber gets: the stored events after the one it last saw, a gap event if some are gone,
/// and the live feed from there on.
pub struct Subscription {
    pub replay: Vec<Arc<Event>>,
    pub live: broadcast::Receiver<Arc<Event>>,
}

impl Hub {
    pub(crate) fn set_engine(&self, engine: Weak<Engine>) {
        let _ = self.engine.set(engine);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sequence number of the newest event.
    pub fn last_seq(&self) -> u64 {
        self.lock().last
    }

    pub(crate) fn publish(
        &self,
        kind: &str,
        id: &str,
        sandbox: Option<&str>,
        state: Option<&str>,
        object: Option<serde_json::Value>,
    ) {
        let mut ring = self.lock();
        ring.last += 1;
        let event = Arc::new(Event {
            seq: ring.last,
            time: now_rfc3339(),
            kind: kind.to_string(),
            id: id.to_string(),
            sandbox: sandbox.map(str::to_string),
            state: state.map(str::to_string),
            object,
        });
        if ring.events.len() == RING_SIZE {
            ring.events.pop_front();
        }
        ring.events.push_back(event.clone());
        // Sent under the ring's lock, so a subscriber's replay and live feed neither overlap nor miss one.
        let _ = self.tx.send(event);
    }

    /// Subscribes; `since` is the last sequence number the client saw (None: only new events).
    pub fn subscribe(&self, since: Option<u64>) -> Subscription {
        let ring = self.lock();
        let live = self.tx.subscribe();
        let mut replay = Vec::new();
        if let Some(since) = since {
            let oldest = ring.events.front().map_or(ring.last + 1, |e| e.seq);
            // A number from before a daemon restart can be ahead of this daemon's count: all is missed.
            let from = if since > ring.last { 0 } else { since };
            if since > ring.last {
                replay.push(Arc::new(gap(1, oldest - 1, GapReason::Restarted)));
            } else if from + 1 < oldest {
                replay.push(Arc::new(gap(from + 1, oldest - 1, GapReason::Old)));
            }
            replay.extend(ring.events.iter().filter(|e| e.seq > from).cloned());
        }
        Subscription { replay, live }
    }

    fn engine(&self) -> Option<Arc<Engine>> {
        self.engine.get().and_then(Weak::upgrade)
    }

    /// A sandbox's change; kiln's own machines (warm spares, template builders) are not reported.
    pub(crate) fn sandbox(&self, kind: &str, sb: &Sandbox) {
        if crate::is_internal_sandbox(sb) {
            return;
        }
        let object = match kind {
            "sandbox.deleted" => None,
            _ => {
                let sb = match self.engine() {
                    Some(e) => e.with_confinement(sb.clone()),
                    None => sb.clone(),
                };
                serde_json::to_value(&sb).ok()
            }
        };
        let state = (kind != "sandbox.deleted").then(|| sb.state.as_str());
        self.publish(kind, &sb.id, Some(&sb.id), state, object);
    }

    /// A snapshot's change; fork captures (ephemeral) and template snapshots are not reported.
    pub(crate) fn snapshot(&self, kind: &str, snap: &Snapshot, ephemeral: bool) {
        if ephemeral || snap.labels.contains_key(crate::template_snap::LABEL) {
            return;
        }
        let object = match kind {
            "snapshot.deleted" => None,
            _ => {
                let snap = match self.engine() {
                    Some(e) => e.with_spares(snap.clone()),
                    None => snap.clone(),
                };
                serde_json::to_value(&snap).ok()
            }
        };
        self.publish(kind, &snap.id, Some(&snap.sandbox_id), None, object);
    }
}

/// Why a client missed events.
#[derive(Debug, Clone, Copy)]
pub enum GapReason {
    /// Older than the ring.
    Old,
    /// The daemon restarted since the client's last event.
    Restarted,
    /// The client read too slowly and the live feed dropped some.
    Slow,
}

/// The `events.gap` event for missed sequence numbers `from..=to`.
pub fn gap(from: u64, to: u64, why: GapReason) -> Event {
    let reason = match why {
        GapReason::Old => "those events are older than the daemon keeps (the newest 4096); re-read the state you need",
        GapReason::Restarted => "the daemon restarted since that event and its numbering began again; re-read the state you need",
        GapReason::Slow => "this client read events too slowly and the daemon dropped some; re-read the state you need",
    };
    Event {
        seq: to,
        time: now_rfc3339(),
        kind: GAP.to_string(),
        id: String::new(),
        sandbox: None,
        state: None,
        object: Some(serde_json::json!({"missed_from": from, "missed_to": to, "reason": reason})),
    }
}

impl Engine {
    /// The event stream.
    pub fn events(&self) -> &Hub {
        self.db().events()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(hub: &Hub, kind: &str, sb: &str) {
        hub.publish(kind, sb, Some(sb), None, None);
    }

    #[test]
    fn replay_gap_and_filters() {
        let hub = Hub::default();
        for i in 0..(RING_SIZE + 10) {
            ev(&hub, "sandbox.state", &format!("sb-{}", i % 2));
        }
        assert_eq!(hub.last_seq(), RING_SIZE as u64 + 10);
        // In the ring: replayed from there, no gap.
        let s = hub.subscribe(Some(RING_SIZE as u64 + 5));
        assert_eq!(
            s.replay.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (RING_SIZE as u64 + 6..=RING_SIZE as u64 + 10).collect::<Vec<_>>()
        );
        // Older than the ring: a gap naming what is missed, then all that is kept.
        let s = hub.subscribe(Some(3));
        assert_eq!(s.replay[0].kind, GAP);
        assert_eq!(s.replay[0].object.as_ref().unwrap()["missed_from"], 4);
        assert_eq!(s.replay[0].object.as_ref().unwrap()["missed_to"], 10);
        assert_eq!(s.replay[1].seq, 11);
        assert_eq!(s.replay.len(), RING_SIZE + 1);
        // Ahead of this daemon's count (it restarted): a gap, then everything kept.
        let s = hub.subscribe(Some(u64::MAX - 1));
        assert_eq!(s.replay[0].kind, GAP);
        assert_eq!(s.replay.len(), RING_SIZE + 1);
        // Live events follow the replay without overlap.
        let mut s = hub.subscribe(Some(hub.last_seq()));
        assert!(s.replay.is_empty());
        ev(&hub, "snapshot.created", "sb-1");
        assert_eq!(s.live.try_recv().unwrap().seq, RING_SIZE as u64 + 11);

        let f = Filter::new(Some("sandbox.,volume.created"), Some("sb-1".into())).unwrap();
        let e = |kind: &str, sb: &str| Event {
            seq: 1,
            time: String::new(),
            kind: kind.into(),
            id: sb.into(),
            sandbox: Some(sb.into()),
            state: None,
            object: None,
        };
        assert!(f.matches(&e("sandbox.state", "sb-1")));
        assert!(!f.matches(&e("sandbox.state", "sb-2")));
        assert!(!f.matches(&e("snapshot.created", "sb-1")));
        assert!(Filter::new(Some("sandbox.*"), None).is_ok());
        let err = Filter::new(Some("sandbox.stat"), None).unwrap_err();
        assert_eq!(err.code, crate::ErrorCode::InvalidRequest);
        assert!(Filter::new(Some("bogus."), None).is_err());
    }
}
