//! Request limits: body sizes (JSON bodies and file uploads) and a per-client token-bucket rate limit.
//! A client is the peer's uid on the unix socket and the peer's IP address on TCP.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;

use crate::error::ApiError;

pub const DEFAULT_MAX_BODY_BYTES: u64 = 1 << 20;
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 4 << 30;
pub const DEFAULT_RATE_PER_SEC: f64 = 200.0;
pub const DEFAULT_RATE_BURST: f64 = 400.0;

/// Size limits; handlers find them as a request extension.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// JSON request bodies.
    pub max_body_bytes: u64,
    /// Files uploaded with `PUT /v1/sandboxes/{id}/files`.
    pub max_upload_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
        }
    }
}

pub fn body_too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!(
            "the request body is larger than the limit of {limit} bytes for JSON bodies; send less (files go through PUT /v1/sandboxes/{{id}}/files) or raise the limit with `kiln serve --max-body-bytes`"
        ),
    )
}

pub fn upload_too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!(
            "the upload is larger than the limit of {limit} bytes; raise it with `kiln serve --max-upload-bytes`"
        ),
    )
}

/// Who a request comes from, for rate limiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    Uid(u32),
    Ip(IpAddr),
    /// The unix peer's credentials could not be read; such clients share one bucket.
    Unknown,
}

impl Connected<IncomingStream<'_, tokio::net::UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        stream
            .io()
            .peer_cred()
            .map(|c| Peer::Uid(c.uid()))
            .unwrap_or(Peer::Unknown)
    }
}

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Peer::Ip(stream.remote_addr().ip())
    }
}

#[derive(Debug, Clone, Copy)]
pub struct RateConfig {
    /// Sustained requests per second per client; 0 turns rate limiting off.
    pub per_sec: f64,
    /// Requests a client may send at once after being idle.
    pub burst: f64,
}

impl Default for RateConfig {
    fn default() -> Self {
        RateConfig {
            per_sec: DEFAULT_RATE_PER_SEC,
            burst: DEFAULT_RATE_BURST,
        }
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct RateLimiter {
    cfg: RateConfig,
    buckets: Mutex<HashMap<Peer, Bucket>>,
}

/// Beyond this many clients, buckets that have refilled completely are forgotten (they carry no state).
const PRUNE_AT: usize = 4096;

impl RateLimiter {
    pub fn new(cfg: RateConfig) -> Self {
        RateLimiter {
            cfg,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `peer`; `Err(seconds)` says when the next one is available.
    pub fn check(&self, peer: Peer, now: Instant) -> Result<(), u64> {
        if self.cfg.per_sec <= 0.0 {
            return Ok(());
        }
        let burst = self.cfg.burst.max(1.0);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= PRUNE_AT {
            let rate = self.cfg.per_sec;
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
        }
        let b = buckets.entry(peer).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.cfg.per_sec).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - b.tokens) / self.cfg.per_sec).ceil().max(1.0) as u64)
        }
    }
}

pub async fn rate_limit(
    State(limiter): State<Arc<RateLimiter>>,
    req: Request,
    next: Next,
) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .map(|c| c.0)
        .unwrap_or(Peer::Unknown);
    match limiter.check(peer, Instant::now()) {
        Ok(()) => next.run(req).await,
        Err(secs) => {
            let mut resp = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "too many requests from this client (limit {} per second, bursts of {}); retry after {secs} s, or raise the limit with `kiln serve --rate-limit`",
                    limiter.cfg.per_sec, limiter.cfg.burst
                ),
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn token_bucket_refills_per_client() {
        let l = RateLimiter::new(RateConfig {
            per_sec: 2.0,
            burst: 3.0,
        });
        let t0 = Instant::now();
        let a = Peer::Uid(1);
        for _ in 0..3 {
            assert!(l.check(a, t0).is_ok());
        }
        assert_eq!(l.check(a, t0), Err(1));
        // Another client has its own bucket.
        assert!(l.check(Peer::Uid(2), t0).is_ok());
        // Half a second gives one token back at 2/s.
        assert!(l.check(a, t0 + Duration::from_millis(500)).is_ok());
        assert!(l.check(a, t0 + Duration::from_millis(500)).is_err());
        let off = RateLimiter::new(RateConfig {
            per_sec: 0.0,
            burst: 0.0,
        });
        for _ in 0..1000 {
            assert!(off.check(a, t0).is_ok());
        }
    }
}
