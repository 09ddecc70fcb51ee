//! The connection machinery: a reader task that routes frames to per-stream queues by
//! stream id, and a writer task that owns the socket's write half.
//!
//! Guest output is bounded on the host: each stream may hold at most [`STREAM_BUFFER`] bytes
//! that its consumer has not taken yet. When a stream is full the reader stops reading the
//! socket, so the guest's writes block (QEMU stops draining the virtio-serial queue) instead of
//! the daemon buffering; a consumer that takes nothing for [`STALL_LIMIT`] loses its stream
//! (cancelled in the guest) so the other streams go on. A frame the guest does not read within
//! [`WRITE_STALL`] resets the whole connection (the next caller reconnects).

use std::collections::HashMap;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kiln_proto::{encode_frame, encode_json, Frame, FrameDecoder, FrameKind, Request, SEND_WINDOW};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;

use crate::AgentError;

/// Encoded frames waiting for the writer. Small, so bulk senders feel the socket's backpressure;
/// a whole frame is queued at once, so a cancelled caller can never leave half a frame behind.
const WRITE_QUEUE: usize = 8;
/// Payload bytes one stream may hold unread (a frame is at most 1 MiB, so one always fits).
pub(crate) const STREAM_BUFFER: usize = 4 << 20;
/// Frames one stream may hold unread (bounds many tiny frames).
const STREAM_FRAMES: usize = 256;
/// How long the reader waits for a full stream's consumer before cancelling that stream.
pub(crate) const STALL_LIMIT: Duration = Duration::from_secs(20);
/// How long one frame may take to go out before the connection is reset.
const WRITE_STALL: Duration = Duration::from_secs(20);
/// A partial frame from the guest older than this is dropped once a valid frame follows it.
const STALE_FRAME: Duration = Duration::from_secs(1);

/// A received frame and its share of the stream's byte budget, released when it is taken.
pub(crate) type Queued = (Frame, OwnedSemaphorePermit);

pub(crate) struct Conn {
    out: mpsc::Sender<Vec<u8>>,
    shutdown: watch::Sender<bool>,
    routes: Arc<Routes>,
    next_id: AtomicU32,
    tasks: [AbortHandle; 2],
}

/// Where frames for each open stream go.
pub(crate) struct Routes {
    inner: Mutex<RoutesInner>,
    connected: AtomicBool,
}

struct RoutesInner {
    streams: HashMap<u32, Route>,
    closed: bool,
}

struct Route {
    tx: mpsc::Sender<Queued>,
    budget: Arc<Semaphore>,
    window: Arc<Window>,
}

/// The receiving end of one stream; unregisters itself when dropped.
pub(crate) struct StreamRx {
    pub id: u32,
    pub window: Arc<Window>,
    rx: mpsc::Receiver<Queued>,
    routes: Arc<Routes>,
}

/// Flow control for the `Stdin`/`Data` we send on one stream: the agent's `Ack`s say how much
/// it has consumed, and we stay within `SEND_WINDOW` of that.
#[derive(Default)]
pub(crate) struct Window {
    acked: AtomicU64,
    ended: AtomicBool,
    /// The host cut the stream because its consumer stopped taking output.
    overrun: AtomicBool,
    changed: Notify,
}

impl Window {
    fn ack(&self, total: u64) {
        self.acked.fetch_max(total, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    fn end(&self) {
        self.ended.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Whether the stream was cut because its output was not taken for [`STALL_LIMIT`].
    pub fn overrun(&self) -> bool {
        self.overrun.load(Ordering::SeqCst)
    }

    /// Waits until `len` more bytes after the first `sent` fit in the window. `false` if the
    /// stream ended meanwhile (answered, dropped, or the connection closed).
    pub async fn reserve(&self, sent: u64, len: u64) -> bool {
        loop {
            let mut changed = pin!(self.changed.notified());
            // Register before checking, so a change between the check and the await is seen.
            changed.as_mut().enable();
            if self.ended.load(Ordering::SeqCst) {
                return false;
            }
            let limit = self
                .acked
                .load(Ordering::SeqCst)
                .saturating_add(SEND_WINDOW);
            if sent.saturating_add(len) <= limit {
                return true;
            }
            changed.await;
        }
    }
}

impl Conn {
    pub fn start(stream: UnixStream) -> Conn {
        let (rd, wr) = stream.into_split();
        let routes = Arc::new(Routes {
            inner: Mutex::new(RoutesInner {
                streams: HashMap::new(),
                closed: false,
            }),
            connected: AtomicBool::new(true),
        });
        let (out, queue) = mpsc::channel(WRITE_QUEUE);
        let (shutdown, stop) = watch::channel(false);
        let reader = tokio::spawn(read_loop(
            rd,
            Arc::clone(&routes),
            out.clone(),
            stop.clone(),
            shutdown.clone(),
        ));
        let writer = tokio::spawn(write_loop(
            wr,
            queue,
            Arc::clone(&routes),
            stop,
            shutdown.clone(),
        ));
        Conn {
            out,
            shutdown,
            routes,
            next_id: AtomicU32::new(1),
            tasks: [reader.abort_handle(), writer.abort_handle()],
        }
    }

    pub fn is_connected(&self) -> bool {
        self.routes.connected.load(Ordering::SeqCst)
    }

    /// Opens a stream with a fresh id.
    pub fn open(&self) -> Result<StreamRx, AgentError> {
        let (tx, rx) = mpsc::channel(STREAM_FRAMES);
        let window = Arc::new(Window::default());
        let id = self.register(tx, Arc::clone(&window))?;
        Ok(StreamRx {
            id,
            window,
            rx,
            routes: Arc::clone(&self.routes),
        })
    }

    /// Registers a fresh stream id whose frames go to `tx`.
    pub fn register(
        &self,
        tx: mpsc::Sender<Queued>,
        window: Arc<Window>,
    ) -> Result<u32, AgentError> {
        let budget = Arc::new(Semaphore::new(STREAM_BUFFER));
        let mut inner = self.routes.lock();
        if inner.closed {
            return Err(AgentError::Disconnected);
        }
        loop {
            // Id 0 is reserved; after wrapping, skip ids still in use.
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 && !inner.streams.contains_key(&id) {
                inner.streams.insert(id, Route { tx, budget, window });
                return Ok(id);
            }
        }
    }

    pub fn unregister(&self, id: u32) {
        self.routes.remove(id);
    }

    pub async fn send_frame(
        &self,
        kind: FrameKind,
        id: u32,
        payload: &[u8],
    ) -> Result<(), AgentError> {
        let bytes =
            encode_frame(kind, id, payload).map_err(|e| AgentError::Protocol(e.to_string()))?;
        self.out
            .send(bytes)
            .await
            .map_err(|_| AgentError::Disconnected)
    }

    /// Queues a frame without waiting; for use in `Drop`. Dropped if the queue is full.
    pub fn try_send_frame(&self, kind: FrameKind, id: u32, payload: &[u8]) {
        if let Ok(bytes) = encode_frame(kind, id, payload) {
            let _ = self.out.try_send(bytes);
        }
    }

    pub async fn send_request(&self, id: u32, req: &Request) -> Result<(), AgentError> {
        let bytes = encode_json(FrameKind::Request, id, req)
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        self.out
            .send(bytes)
            .await
            .map_err(|_| AgentError::Disconnected)
    }

    /// Opens a stream and sends `req` on it.
    pub async fn request(&self, req: &Request) -> Result<StreamRx, AgentError> {
        let stream = self.open()?;
        self.send_request(stream.id, req).await?;
        Ok(stream)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        let _ = self.shutdown.send(true);
        self.routes.close();
    }
}

impl Routes {
    fn lock(&self) -> MutexGuard<'_, RoutesInner> {
        // Never poisoned in practice: no code panics while holding it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where a received frame goes: `None` for acks (handled here) and unknown streams.
    fn route_for(&self, frame: &Frame) -> Option<(mpsc::Sender<Queued>, Arc<Semaphore>)> {
        let inner = self.lock();
        // Frames for unknown streams are expected after a snapshot restore: ignore them.
        let route = inner.streams.get(&frame.stream)?;
        if frame.kind == FrameKind::Ack {
            if let Ok(total) = <[u8; 8]>::try_from(frame.payload.as_slice()) {
                route.window.ack(u64::from_le_bytes(total));
            }
            return None;
        }
        Some((route.tx.clone(), Arc::clone(&route.budget)))
    }

    /// Hands a frame to its stream, waiting (and so not reading the socket) while the stream
    /// is full. Returns the id of a stream cut for not being read, to cancel it in the guest.
    async fn deliver(&self, frame: Frame) -> Option<u32> {
        let id = frame.stream;
        let kind = frame.kind;
        let (tx, budget) = self.route_for(&frame)?;
        let cost = u32::try_from(frame.payload.len().clamp(1, STREAM_BUFFER)).unwrap_or(1);
        let queued = tokio::time::timeout(STALL_LIMIT, async {
            // A consumer that goes away (dropped its stream) frees the reader at once.
            let permit = tokio::select! {
                permit = budget.acquire_many_owned(cost) => permit.ok()?,
                () = tx.closed() => return None,
            };
            tx.send((frame, permit)).await.ok()
        })
        .await;
        match queued {
            Ok(Some(())) if kind != FrameKind::Response => None,
            // Answered (the last frame), or the receiver is gone.
            Ok(_) => {
                self.remove(id);
                None
            }
            Err(_) => {
                if let Some(route) = self.lock().streams.remove(&id) {
                    route.window.overrun.store(true, Ordering::SeqCst);
                    route.window.end();
                }
                Some(id)
            }
        }
    }

    fn remove(&self, id: u32) {
        if let Some(route) = self.lock().streams.remove(&id) {
            route.window.end();
        }
    }

    /// Fails every open stream (their receivers see the channel close) and refuses new ones.
    fn close(&self) {
        self.connected.store(false, Ordering::SeqCst);
        let mut inner = self.lock();
        inner.closed = true;
        for (_, route) in inner.streams.drain() {
            route.window.end();
        }
    }
}

impl StreamRx {
    /// The next frame; `None` once the connection is gone or the stream was closed.
    pub async fn recv(&mut self) -> Option<Frame> {
        self.rx.recv().await.map(|(frame, _permit)| frame)
    }

    pub fn try_recv(&mut self) -> Option<Frame> {
        self.rx.try_recv().ok().map(|(frame, _permit)| frame)
    }
}

impl Drop for StreamRx {
    fn drop(&mut self) {
        self.routes.remove(self.id);
    }
}

async fn read_loop(
    mut rd: OwnedReadHalf,
    routes: Arc<Routes>,
    out: mpsc::Sender<Vec<u8>>,
    mut stop: watch::Receiver<bool>,
    shutdown: watch::Sender<bool>,
) {
    let mut decoder = FrameDecoder::with_stale_recovery(STALE_FRAME);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = rd.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        decoder.push_at(&buf[..n], Instant::now());
        while let Some(frame) = decoder.next_frame() {
            let cut = tokio::select! {
                cut = routes.deliver(frame) => cut,
                _ = stop.wait_for(|s| *s) => break,
            };
            if let Some(cut) = cut {
                // Best effort: if the guest does not take even this, the writer resets the link.
                if let Ok(bytes) = encode_frame(FrameKind::Cancel, cut, &[]) {
                    let _ = out.try_send(bytes);
                }
            }
        }
    }
    let _ = shutdown.send(true);
    routes.close();
}

async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut queue: mpsc::Receiver<Vec<u8>>,
    routes: Arc<Routes>,
    mut stop: watch::Receiver<bool>,
    shutdown: watch::Sender<bool>,
) {
    loop {
        let bytes = tokio::select! {
            b = queue.recv() => match b {
                Some(b) => b,
                None => break,
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        // A guest that stops reading must not wedge every caller behind a half-sent frame:
        // closing the socket makes the agent drop what it buffered, and callers reconnect.
        match tokio::time::timeout(WRITE_STALL, wr.write_all(&bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    let _ = shutdown.send(true);
    routes.close();
}
