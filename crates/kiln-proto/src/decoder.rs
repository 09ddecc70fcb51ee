//! Incremental, self-synchronising frame decoder.

use std::time::{Duration, Instant};

use crate::frame::{
    parse_header, payload_ok, Frame, FrameKind, HEADER_LEN, MAX_PAYLOAD, TRAILER_LEN,
};

const MAGIC_BYTES: [u8; 4] = crate::frame::MAGIC.to_le_bytes();
/// Consumed bytes are only shifted out once this many have piled up, to keep pushes cheap.
const COMPACT_AT: usize = 64 * 1024;

/// Counters describing how much garbage the decoder has had to skip.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecoderStats {
    /// Frames decoded and returned.
    pub frames: u64,
    /// Times the decoder lost sync (garbage, bad crc, oversize length, stale partial frame).
    pub resyncs: u64,
    /// Bytes thrown away while resynchronising.
    pub skipped_bytes: u64,
    /// Valid frames dropped because their kind is unknown to this version.
    pub unknown_kinds: u64,
}

/// Push bytes in with [`push`](Self::push), then call [`next_frame`](Self::next_frame) until it
/// returns `None`. Memory stays bounded by one maximal frame plus the bytes of the last push.
///
/// On a bad magic, header crc, length or payload crc the decoder restarts scanning at the byte
/// after the rejected magic, so a valid frame that was hidden behind garbage is still found.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    pos: usize,
    in_sync: bool,
    stats: DecoderStats,
    stale_after: Option<Duration>,
    now: Option<Instant>,
    pending_since: Option<Instant>,
}

impl FrameDecoder {
    pub fn new() -> FrameDecoder {
        FrameDecoder {
            in_sync: true,
            ..FrameDecoder::default()
        }
    }

    /// A decoder that gives up on a partial frame which has been waiting longer than `after`
    /// (measured with the instants passed to [`push_at`](Self::push_at)) once a complete valid
    /// frame is buffered behind its header.
    ///
    /// This recovers from a peer that vanished mid-frame while the transport stayed up (a VM
    /// restored into a new QEMU whose new host connected before the guest noticed): otherwise
    /// the stale header's length would swallow up to 1 MiB of the new peer's frames.
    pub fn with_stale_recovery(after: Duration) -> FrameDecoder {
        FrameDecoder {
            stale_after: Some(after),
            ..FrameDecoder::new()
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos >= COMPACT_AT && self.pos * 2 >= self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Appends received bytes that arrived at `now` (enables stale-frame recovery).
    pub fn push_at(&mut self, data: &[u8], now: Instant) {
        self.now = Some(now);
        self.push(data);
    }

    /// Drops everything buffered, e.g. because the peer disconnected.
    pub fn reset(&mut self) {
        if self.pos < self.buf.len() {
            self.stats.skipped_bytes += (self.buf.len() - self.pos) as u64;
        }
        self.buf.clear();
        self.pos = 0;
        self.in_sync = true;
        self.pending_since = None;
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn stats(&self) -> DecoderStats {
        self.stats
    }

    /// The next complete frame, or `None` if more bytes are needed.
    pub fn next_frame(&mut self) -> Option<Frame> {
        loop {
            let avail = &self.buf[self.pos..];
            match find_magic(avail) {
                Some(0) => {}
                Some(at) => {
                    self.skip(at);
                    continue;
                }
                None => {
                    // Keep a tail that may be the start of a magic split across pushes.
                    let keep = avail.len().min(MAGIC_BYTES.len() - 1);
                    self.skip(avail.len() - keep);
                    return None;
                }
            }
            if avail.len() < HEADER_LEN {
                return None;
            }
            let Some(header) = parse_header(avail) else {
                self.reject();
                continue;
            };
            if header.len > MAX_PAYLOAD {
                self.reject();
                continue;
            }
            let total = HEADER_LEN + header.len + TRAILER_LEN;
            if avail.len() < total {
                if self.pending_is_stale() {
                    self.reject();
                    continue;
                }
                if self.pending_since.is_none() {
                    self.pending_since = self.now;
                }
                return None;
            }
            if !payload_ok(avail, header.len) {
                self.reject();
                continue;
            }
            let payload = avail[HEADER_LEN..HEADER_LEN + header.len].to_vec();
            self.pos += total;
            self.pending_since = None;
            self.in_sync = true;
            match FrameKind::from_u8(header.kind) {
                Some(kind) => {
                    self.stats.frames += 1;
                    return Some(Frame {
                        kind,
                        stream: header.stream,
                        payload,
                    });
                }
                None => self.stats.unknown_kinds += 1,
            }
        }
    }

    /// Discards `n` garbage bytes.
    fn skip(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        if self.in_sync {
            self.stats.resyncs += 1;
            self.in_sync = false;
        }
        self.stats.skipped_bytes += n as u64;
        self.pos += n;
        self.pending_since = None;
    }

    /// Rejects the candidate frame at `pos`: scanning resumes after its magic's first byte.
    fn reject(&mut self) {
        self.skip(1);
    }

    fn pending_is_stale(&self) -> bool {
        let (Some(after), Some(now), Some(since)) =
            (self.stale_after, self.now, self.pending_since)
        else {
            return false;
        };
        now.saturating_duration_since(since) > after && self.complete_frame_after_pending()
    }

    /// Whether a complete, crc-valid frame starts somewhere after the pending header.
    fn complete_frame_after_pending(&self) -> bool {
        let avail = &self.buf[self.pos..];
        let mut at = 1;
        while let Some(off) = find_magic(&avail[at..]) {
            let cand = &avail[at + off..];
            if let Some(h) = parse_header(cand) {
                if h.len <= MAX_PAYLOAD
                    && cand.len() >= HEADER_LEN + h.len + TRAILER_LEN
                    && payload_ok(cand, h.len)
                {
                    return true;
                }
            }
            at += off + 1;
        }
        false
    }
}

fn find_magic(buf: &[u8]) -> Option<usize> {
    buf.windows(MAGIC_BYTES.len())
        .position(|w| w == MAGIC_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode_frame, MAX_FRAME_LEN};

    fn frames() -> Vec<Frame> {
        vec![
            Frame {
                kind: FrameKind::Request,
                stream: 1,
                payload: br#"{"op":"ping"}"#.to_vec(),
            },
            Frame {
                kind: FrameKind::Stdout,
                stream: 7,
                payload: vec![],
            },
            Frame {
                kind: FrameKind::Data,
                stream: u32::MAX,
                payload: (0..=255u8).cycle().take(5000).collect(),
            },
            // A payload that itself contains the magic must not confuse the decoder.
            Frame {
                kind: FrameKind::Stdin,
                stream: 2,
                payload: b"xxKLN1KLN1yy".to_vec(),
            },
        ]
    }

    fn wire(frames: &[Frame]) -> Vec<u8> {
        frames.iter().flat_map(|f| f.encode().unwrap()).collect()
    }

    fn drain(d: &mut FrameDecoder) -> Vec<Frame> {
        std::iter::from_fn(|| d.next_frame()).collect()
    }

    #[test]
    fn round_trip_in_one_push() {
        let mut d = FrameDecoder::new();
        d.push(&wire(&frames()));
        assert_eq!(drain(&mut d), frames());
        assert_eq!(d.buffered(), 0);
        assert_eq!(d.stats().resyncs, 0);
        assert_eq!(d.stats().frames, 4);
    }

    #[test]
    fn split_at_every_byte_boundary() {
        let bytes = wire(&frames());
        for cut in 0..=bytes.len() {
            let mut d = FrameDecoder::new();
            d.push(&bytes[..cut]);
            let mut got = drain(&mut d);
            d.push(&bytes[cut..]);
            got.extend(drain(&mut d));
            assert_eq!(got, frames(), "cut at {cut}");
            assert_eq!(d.stats().resyncs, 0);
        }
    }

    #[test]
    fn byte_at_a_time() {
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for b in wire(&frames()) {
            d.push(&[b]);
            got.extend(drain(&mut d));
        }
        assert_eq!(got, frames());
    }

    #[test]
    fn resyncs_after_garbage_and_partial_frames() {
        let good = wire(&frames());
        let first = encode_frame(FrameKind::Request, 9, b"truncated frame payload").unwrap();
        let prefixes: Vec<Vec<u8>> = vec![
            b"random garbage \x00\xff".to_vec(),
            b"KLN".to_vec(),
            b"KLN1".to_vec(),
            b"KLN1KLN1KLN1\x01\x02".to_vec(),
            first[..10].to_vec(),
            first[..HEADER_LEN + 3].to_vec(),
            first[3..].to_vec(),
            first[..first.len() - 1].to_vec(),
        ];
        for prefix in prefixes {
            let mut d = FrameDecoder::new();
            let mut input = prefix.clone();
            input.extend_from_slice(&good);
            // The truncated-frame prefixes claim more payload than they carry, so a complete
            // frame is only recovered once enough later bytes arrive: feed trailing padding.
            d.push(&input);
            let mut got = drain(&mut d);
            d.push(&[0u8; 64]);
            got.extend(drain(&mut d));
            let tail: Vec<Frame> = got.iter().rev().take(4).rev().cloned().collect();
            assert_eq!(tail, frames(), "prefix {prefix:?}");
            assert!(
                got.len() == 4,
                "prefix {prefix:?} produced {} frames",
                got.len()
            );
        }
    }

    #[test]
    fn corrupted_payload_is_dropped_and_next_frame_survives() {
        let mut bytes = encode_frame(FrameKind::Data, 1, b"hello world").unwrap();
        bytes[HEADER_LEN + 2] ^= 0x40;
        bytes.extend(wire(&frames()));
        let mut d = FrameDecoder::new();
        d.push(&bytes);
        assert_eq!(drain(&mut d), frames());
        assert_eq!(d.stats().resyncs, 1);
        assert!(d.stats().skipped_bytes > 0);
    }

    #[test]
    fn corrupted_header_is_dropped() {
        let mut bytes = encode_frame(FrameKind::Data, 1, b"hello world").unwrap();
        bytes[6] ^= 1; // stream id no longer matches the header crc
        bytes.extend(wire(&frames()));
        let mut d = FrameDecoder::new();
        d.push(&bytes);
        assert_eq!(drain(&mut d), frames());
        assert_eq!(d.stats().resyncs, 1);
    }

    /// A header with a valid crc but a length over the limit is rejected without waiting for,
    /// or allocating, the claimed payload.
    #[test]
    fn oversize_length_is_rejected() {
        let mut head = Vec::new();
        head.extend_from_slice(&MAGIC_BYTES);
        head.push(FrameKind::Data as u8);
        head.extend_from_slice(&1u32.to_le_bytes());
        head.extend_from_slice(&(u32::MAX).to_le_bytes());
        let crc = crc32fast::hash(&head);
        head.extend_from_slice(&crc.to_le_bytes());
        head.extend(wire(&frames()));
        let mut d = FrameDecoder::new();
        d.push(&head);
        assert_eq!(drain(&mut d), frames());
        assert_eq!(d.stats().resyncs, 1);
        assert!(d.buf.capacity() < 2 * MAX_FRAME_LEN);
    }

    #[test]
    fn unknown_kind_is_skipped() {
        let mut bytes = encode_frame(FrameKind::Data, 1, b"abc").unwrap();
        bytes[4] = 200;
        let crc = crc32fast::hash(&bytes[..13]);
        bytes[13..17].copy_from_slice(&crc.to_le_bytes());
        bytes.extend(wire(&frames()));
        let mut d = FrameDecoder::new();
        d.push(&bytes);
        assert_eq!(drain(&mut d), frames());
        assert_eq!(d.stats().unknown_kinds, 1);
        assert_eq!(d.stats().resyncs, 0);
    }

    #[test]
    fn pure_garbage_keeps_memory_bounded() {
        let mut d = FrameDecoder::new();
        let junk: Vec<u8> = (0..100_000u32).map(|i| (i * 7919 % 251) as u8).collect();
        for _ in 0..100 {
            d.push(&junk);
            assert!(drain(&mut d).is_empty());
            assert!(d.buffered() < MAGIC_BYTES.len());
        }
        assert_eq!(d.stats().resyncs, 1);
    }

    #[test]
    fn reset_drops_partial_frame() {
        let bytes = wire(&frames());
        let mut d = FrameDecoder::new();
        d.push(&bytes[..HEADER_LEN + 5]);
        assert!(d.next_frame().is_none());
        d.reset();
        d.push(&bytes);
        assert_eq!(drain(&mut d), frames());
    }

    /// The old peer died after sending the header of a large frame; the new peer's frames must
    /// not stay swallowed by that frame's claimed length forever.
    #[test]
    fn stale_partial_frame_is_abandoned() {
        let big = encode_frame(FrameKind::Data, 3, &vec![7u8; 500_000]).unwrap();
        let t0 = Instant::now();
        let mut d = FrameDecoder::with_stale_recovery(Duration::from_secs(1));
        d.push_at(&big[..1000], t0);
        assert!(d.next_frame().is_none());
        let hello = encode_frame(FrameKind::Request, 1, br#"{"op":"hello"}"#).unwrap();
        d.push_at(&hello, t0 + Duration::from_millis(200));
        assert!(d.next_frame().is_none(), "not stale yet");
        d.push_at(&hello, t0 + Duration::from_millis(1300));
        let got = drain(&mut d);
        assert_eq!(got.len(), 2);
        assert!(got
            .iter()
            .all(|f| f.kind == FrameKind::Request && f.stream == 1));
        assert_eq!(d.stats().resyncs, 1);
    }

    /// A slow but live peer: an old pending frame with no complete frame behind it is kept.
    #[test]
    fn slow_frame_is_not_abandoned_without_evidence() {
        let big = encode_frame(FrameKind::Data, 3, &vec![7u8; 300_000]).unwrap();
        let t0 = Instant::now();
        let mut d = FrameDecoder::with_stale_recovery(Duration::from_secs(1));
        d.push_at(&big[..100_000], t0);
        assert!(d.next_frame().is_none());
        d.push_at(&big[100_000..200_000], t0 + Duration::from_secs(5));
        assert!(d.next_frame().is_none());
        d.push_at(&big[200_000..], t0 + Duration::from_secs(10));
        let f = d.next_frame().unwrap();
        assert_eq!(f.payload.len(), 300_000);
        assert_eq!(d.stats().resyncs, 0);
    }
}
