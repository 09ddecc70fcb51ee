//! Small helpers shared by the agent's modules.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Logs to stderr, which the guest wires to the VM console.
macro_rules! log {
    ($($arg:tt)*) => { eprintln!("kiln-agent: {}", format_args!($($arg)*)) };
}
pub(crate) use log;

/// Locks a mutex, ignoring poisoning: every critical section leaves its data consistent.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Lets one log line through per interval, so a noisy condition cannot flood the console.
pub struct RateLimit {
    every: Duration,
    last: Option<Instant>,
}

impl RateLimit {
    pub const fn new(every: Duration) -> RateLimit {
        RateLimit { every, last: None }
    }

    pub fn ready(&mut self) -> bool {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < self.every => false,
            _ => {
                self.last = Some(now);
                true
            }
        }
    }
}

/// Decodes a hex string (either case).
pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let pairs = s.as_bytes().chunks_exact(2);
    if !pairs.remainder().is_empty() {
        return None;
    }
    pairs
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex() {
        assert_eq!(decode_hex("00ffA5"), Some(vec![0, 255, 0xa5]));
        assert_eq!(decode_hex(""), Some(vec![]));
        assert_eq!(decode_hex("abc"), None);
        assert_eq!(decode_hex("zz"), None);
    }

    #[test]
    fn rate_limit() {
        let mut r = RateLimit::new(Duration::from_secs(60));
        assert!(r.ready());
        assert!(!r.ready());
    }
}
