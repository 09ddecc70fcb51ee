//! Connection state shared by the reader and the request threads: the frame writer, the host
//! session, and the table routing host frames to the stream that owns them.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use kiln_proto::{encode_frame, encode_json, FrameKind, Response};
use serde::Serialize;

use crate::port::PortWriter;
use crate::util::{lock, log};

/// What a request thread receives: frames the host sent on its stream, plus notifications.
#[derive(Debug)]
pub enum Inbound {
    Stdin(Vec<u8>),
    StdinClose,
    Data(Vec<u8>),
    /// The total byte count the host says it sent, if it said.
    DataEnd(Option<u64>),
    Cancel,
    /// A new host session started (see PROTOCOL.md): nobody will read this stream's output.
    Detached,
    /// Exec-internal: the child exited (not yet reaped).
    ChildExited,
    /// Exec-internal: one of the child's output pipes reached EOF.
    OutputClosed,
}

struct Out {
    port: PortWriter,
    /// Bumped by every Hello; frames of older sessions are dropped.
    session: u64,
}

struct Route {
    id: u64,
    tx: Sender<Inbound>,
}

pub struct Shared {
    out: Mutex<Out>,
    /// Mirror of `Out::session` for readers that must not wait behind a slow write.
    session: AtomicU64,
    routes: Mutex<HashMap<u32, Route>>,
    next_route: AtomicU64,
    /// Process groups of running execs, killed when the agent exits in test mode.
    groups: Mutex<HashSet<i32>>,
}

/// One request's stream, as seen by the threads serving it.
pub struct Stream {
    shared: Arc<Shared>,
    id: u32,
    session: u64,
    route: u64,
    done: AtomicBool,
}

impl Shared {
    pub fn new(port: PortWriter) -> Arc<Shared> {
        Arc::new(Shared {
            out: Mutex::new(Out { port, session: 0 }),
            session: AtomicU64::new(0),
            routes: Mutex::new(HashMap::new()),
            next_route: AtomicU64::new(1),
            groups: Mutex::new(HashSet::new()),
        })
    }

    fn session(&self) -> u64 {
        self.session.load(Ordering::SeqCst)
    }

    /// Writes one frame if `session` is still current and `gate` allows it.
    fn write(&self, session: u64, bytes: &[u8], gate: impl FnOnce() -> bool) -> bool {
        let mut out = lock(&self.out);
        if out.session != session || !gate() {
            return false;
        }
        // A failed write means the host is gone; the frame is lost either way.
        out.port.write_all(bytes).is_ok()
    }

    /// Answers a request without opening a stream for it.
    pub fn reply(&self, stream: u32, response: &Response) {
        if let Some(bytes) = encode(FrameKind::Response, stream, response) {
            self.write(self.session(), &bytes, || true);
        }
    }

    /// Starts a new host session and answers its Hello. Streams of earlier sessions keep
    /// running but are detached: their output is dropped and they get no more input.
    pub fn new_session(&self, stream: u32, hello: &Response) {
        {
            let mut out = lock(&self.out);
            out.session += 1;
            self.session.store(out.session, Ordering::SeqCst);
            if let Some(bytes) = encode(FrameKind::Response, stream, hello) {
                // Best effort: a lost reply makes the host resend Hello.
                let _ = out.port.write_all(&bytes);
            }
        }
        let old: Vec<Route> = lock(&self.routes).drain().map(|(_, r)| r).collect();
        for route in old {
            let _ = route.tx.send(Inbound::Detached);
        }
    }

    /// Registers a stream for a new request. `None` if the id is already in use.
    pub fn open_stream(
        self: &Arc<Self>,
        id: u32,
    ) -> Option<(Arc<Stream>, Sender<Inbound>, Receiver<Inbound>)> {
        let (tx, rx) = mpsc::channel();
        let route = self.next_route.fetch_add(1, Ordering::Relaxed);
        let session = self.session();
        {
            let mut routes = lock(&self.routes);
            if routes.contains_key(&id) {
                return None;
            }
            routes.insert(
                id,
                Route {
                    id: route,
                    tx: tx.clone(),
                },
            );
        }
        let stream = Arc::new(Stream {
            shared: Arc::clone(self),
            id,
            session,
            route,
            done: AtomicBool::new(false),
        });
        Some((stream, tx, rx))
    }

    /// Hands a host frame to the stream that owns `id`; frames for unknown streams (finished,
    /// or from an earlier session) are dropped.
    pub fn route(&self, id: u32, msg: Inbound) {
        if let Some(route) = lock(&self.routes).get(&id) {
            let _ = route.tx.send(msg);
        }
    }

    fn close_route(&self, id: u32, route: u64) {
        let mut routes = lock(&self.routes);
        if routes.get(&id).is_some_and(|r| r.id == route) {
            routes.remove(&id);
        }
    }

    pub fn add_group(&self, pgid: i32) {
        lock(&self.groups).insert(pgid);
    }

    pub fn remove_group(&self, pgid: i32) {
        lock(&self.groups).remove(&pgid);
    }

    /// Kills every running exec's process group.
    pub fn kill_all_groups(&self) {
        for pgid in lock(&self.groups).drain() {
            // SAFETY: plain syscall; the group ids are of children we have not reaped yet.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
}

impl Stream {
    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Sends a data frame (Stdout, Stderr, Data). Dropped once the stream has finished or
    /// its session is over. Returns whether it was written.
    pub fn send(&self, kind: FrameKind, payload: &[u8]) -> bool {
        match encode_frame(kind, self.id, payload) {
            Ok(bytes) => self
                .shared
                .write(self.session, &bytes, || !self.done.load(Ordering::Relaxed)),
            Err(e) => {
                log!("stream {}: cannot encode frame: {e}", self.id);
                false
            }
        }
    }

    /// Acknowledges `total` bytes of host data consumed on this stream (flow control).
    pub fn ack(&self, total: u64) {
        self.send(FrameKind::Ack, &total.to_le_bytes());
    }

    pub fn event(&self, event: &impl Serialize) {
        if let Some(bytes) = encode(FrameKind::Event, self.id, event) {
            self.shared
                .write(self.session, &bytes, || !self.done.load(Ordering::Relaxed));
        }
    }

    /// Sends the final response. Later frames on this stream are dropped, so it really is last.
    pub fn finish(&self, response: &Response) {
        self.shared.close_route(self.id, self.route);
        if let Some(bytes) = encode(FrameKind::Response, self.id, response) {
            self.shared.write(self.session, &bytes, || {
                !self.done.swap(true, Ordering::Relaxed)
            });
        }
        self.done.store(true, Ordering::Relaxed);
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.shared.close_route(self.id, self.route);
    }
}

fn encode(kind: FrameKind, stream: u32, msg: &impl Serialize) -> Option<Vec<u8>> {
    encode_json(kind, stream, msg)
        .map_err(|e| log!("stream {stream}: cannot encode message: {e}"))
        .ok()
}
