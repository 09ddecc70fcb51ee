//! The connection machinery: a reader task that routes frames to per-stream channels by
//! stream id, and a writer task that owns the socket's write half.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kiln_proto::{encode_frame, encode_json, Frame, FrameDecoder, FrameKind, Request, SEND_WINDOW};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, Notify};
use tokio::task::AbortHandle;

use crate::AgentError;

/// Encoded frames waiting for the writer. Small, so bulk senders feel the socket's backpressure;
/// a whole frame is queued at once, so a cancelled caller can never leave half a frame behind.
const WRITE_QUEUE: usize = 8;

pub(crate) struct Conn {
    out: mpsc::Sender<Vec<u8>>,
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
    tx: mpsc::UnboundedSender<Frame>,
    window: Arc<Window>,
}

/// The receiving end of one stream; unregisters itself when dropped.
pub(crate) struct StreamRx {
    pub id: u32,
    pub window: Arc<Window>,
    rx: mpsc::UnboundedReceiver<Frame>,
    routes: Arc<Routes>,
}

/// Flow control for the `Stdin`/`Data` we send on one stream: the agent's `Ack`s say how much
/// it has consumed, and we stay within `SEND_WINDOW` of that.
#[derive(Default)]
pub(crate) struct Window {
    acked: AtomicU64,
    ended: AtomicBool,
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
        let reader = tokio::spawn(read_loop(rd, Arc::clone(&routes)));
        let writer = tokio::spawn(write_loop(wr, queue, Arc::clone(&routes)));
        Conn {
            out,
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
        let (tx, rx) = mpsc::unbounded_channel();
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
        tx: mpsc::UnboundedSender<Frame>,
        window: Arc<Window>,
    ) -> Result<u32, AgentError> {
        let mut inner = self.routes.lock();
        if inner.closed {
            return Err(AgentError::Disconnected);
        }
        loop {
            // Id 0 is reserved; after wrapping, skip ids still in use.
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 && !inner.streams.contains_key(&id) {
                inner.streams.insert(id, Route { tx, window });
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
        self.routes.close();
    }
}

impl Routes {
    fn lock(&self) -> MutexGuard<'_, RoutesInner> {
        // Never poisoned in practice: no code panics while holding it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn deliver(&self, frame: Frame) {
        let id = frame.stream;
        let mut inner = self.lock();
        // Frames for unknown streams are expected after a snapshot restore: ignore them.
        let Some(route) = inner.streams.get(&id) else {
            return;
        };
        match frame.kind {
            FrameKind::Ack => {
                if let Ok(total) = <[u8; 8]>::try_from(frame.payload.as_slice()) {
                    route.window.ack(u64::from_le_bytes(total));
                }
            }
            kind => {
                if route.tx.send(frame).is_err() || kind == FrameKind::Response {
                    if let Some(route) = inner.streams.remove(&id) {
                        route.window.end();
                    }
                }
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
        self.rx.recv().await
    }

    pub fn try_recv(&mut self) -> Option<Frame> {
        self.rx.try_recv().ok()
    }
}

impl Drop for StreamRx {
    fn drop(&mut self) {
        self.routes.remove(self.id);
    }
}

async fn read_loop(mut rd: OwnedReadHalf, routes: Arc<Routes>) {
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                decoder.push(&buf[..n]);
                while let Some(frame) = decoder.next_frame() {
                    routes.deliver(frame);
                }
            }
        }
    }
    routes.close();
}

async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut queue: mpsc::Receiver<Vec<u8>>,
    routes: Arc<Routes>,
) {
    while let Some(bytes) = queue.recv().await {
        if wr.write_all(&bytes).await.is_err() {
            routes.close();
            return;
        }
    }
}
