//! Frame layout, frame kinds and encoding.

use crate::ProtoError;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// `"KLN1"` read as a little-endian u32; every frame starts with it.
pub const MAGIC: u32 = 0x314E_4C4B;
/// Magic, kind, stream id, payload length and header crc.
pub const HEADER_LEN: usize = 17;
/// The payload crc that follows the payload.
pub const TRAILER_LEN: usize = 4;
/// Largest payload a frame may carry (1 MiB).
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Largest encoded frame.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + MAX_PAYLOAD + TRAILER_LEN;
/// Preferred size of the chunks sent in `Stdout`/`Stderr`/`Stdin`/`Data` frames.
pub const DATA_CHUNK: usize = 256 * 1024;
/// Flow control for host → agent bulk data: a host may have at most this many bytes of
/// `Stdin`/`Data` payload on one stream that the agent has not acknowledged with `Ack`.
pub const SEND_WINDOW: u64 = 4 << 20;
/// The agent acknowledges consumed `Stdin`/`Data` bytes at least this often.
pub const ACK_EVERY: u64 = 1 << 20;

/// What a frame carries. The discriminant is the wire value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Host → agent: a JSON [`crate::Request`] that opens a stream.
    Request = 1,
    /// Agent → host: the JSON [`crate::Response`] that closes a stream.
    Response = 2,
    /// Agent → host: an intermediate JSON [`crate::Event`].
    Event = 3,
    /// Agent → host: raw bytes the process wrote to stdout.
    Stdout = 4,
    /// Agent → host: raw bytes the process wrote to stderr.
    Stderr = 5,
    /// Host → agent: raw bytes for the process's stdin.
    Stdin = 6,
    /// Host → agent: close the process's stdin (empty payload).
    StdinClose = 7,
    /// File contents, in either direction.
    Data = 8,
    /// Host → agent: end of `Data` for a `WriteFile`; payload is the total byte count as u64 LE.
    DataEnd = 9,
    /// Host → agent: abort the stream's operation (empty payload).
    Cancel = 10,
    /// Agent → host: total `Stdin`/`Data` payload bytes of the stream consumed so far, u64 LE.
    Ack = 11,
}

impl FrameKind {
    /// The kind for a wire value, `None` for values this version does not know.
    pub fn from_u8(v: u8) -> Option<FrameKind> {
        Some(match v {
            1 => FrameKind::Request,
            2 => FrameKind::Response,
            3 => FrameKind::Event,
            4 => FrameKind::Stdout,
            5 => FrameKind::Stderr,
            6 => FrameKind::Stdin,
            7 => FrameKind::StdinClose,
            8 => FrameKind::Data,
            9 => FrameKind::DataEnd,
            10 => FrameKind::Cancel,
            11 => FrameKind::Ack,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// Parses the payload as JSON (for `Request`, `Response` and `Event` frames).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ProtoError> {
        serde_json::from_slice(&self.payload).map_err(ProtoError::Json)
    }

    /// Encodes this frame.
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        encode_frame(self.kind, self.stream, &self.payload)
    }
}

/// Appends one encoded frame to `out`.
pub fn encode_frame_into(
    out: &mut Vec<u8>,
    kind: FrameKind,
    stream: u32,
    payload: &[u8],
) -> Result<(), ProtoError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(ProtoError::PayloadTooLarge(payload.len()));
    }
    out.reserve(HEADER_LEN + payload.len() + TRAILER_LEN);
    let start = out.len();
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(kind as u8);
    out.extend_from_slice(&stream.to_le_bytes());
    // Cannot truncate: checked against MAX_PAYLOAD above.
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let header_crc = crc32fast::hash(&out[start..start + HEADER_LEN - 4]);
    out.extend_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    Ok(())
}

/// Encodes one frame.
pub fn encode_frame(kind: FrameKind, stream: u32, payload: &[u8]) -> Result<Vec<u8>, ProtoError> {
    let mut out = Vec::new();
    encode_frame_into(&mut out, kind, stream, payload)?;
    Ok(out)
}

/// Encodes one frame whose payload is `msg` as JSON.
pub fn encode_json<T: Serialize>(
    kind: FrameKind,
    stream: u32,
    msg: &T,
) -> Result<Vec<u8>, ProtoError> {
    let payload = serde_json::to_vec(msg).map_err(ProtoError::Json)?;
    encode_frame(kind, stream, &payload)
}

/// A header that passed its crc check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub kind: u8,
    pub stream: u32,
    pub len: usize,
}

/// Parses a header from the start of `buf`. `None` if it is not one (bad magic or crc).
pub(crate) fn parse_header(buf: &[u8]) -> Option<Header> {
    let head: &[u8; HEADER_LEN] = buf.get(..HEADER_LEN)?.try_into().ok()?;
    let word = |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    if word(0) != MAGIC || word(13) != crc32fast::hash(&head[..13]) {
        return None;
    }
    Some(Header {
        kind: head[4],
        stream: word(5),
        len: word(9) as usize,
    })
}

/// Checks the payload crc of a frame that is entirely in `buf` (header at 0).
pub(crate) fn payload_ok(buf: &[u8], len: usize) -> bool {
    let payload = &buf[HEADER_LEN..HEADER_LEN + len];
    let at = HEADER_LEN + len;
    let want = u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
    crc32fast::hash(payload) == want
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_as_documented() {
        let f = encode_frame(FrameKind::Stdout, 0x0102_0304, b"hi").unwrap();
        assert_eq!(&f[..4], b"KLN1");
        assert_eq!(f[4], 4);
        assert_eq!(&f[5..9], &[4, 3, 2, 1]);
        assert_eq!(&f[9..13], &[2, 0, 0, 0]);
        assert_eq!(&f[13..17], &crc32fast::hash(&f[..13]).to_le_bytes());
        assert_eq!(&f[17..19], b"hi");
        assert_eq!(&f[19..], &crc32fast::hash(b"hi").to_le_bytes());
        assert_eq!(f.len(), HEADER_LEN + 2 + TRAILER_LEN);
    }

    #[test]
    fn oversize_payload_is_refused() {
        let big = vec![0u8; MAX_PAYLOAD + 1];
        assert!(matches!(
            encode_frame(FrameKind::Data, 1, &big),
            Err(ProtoError::PayloadTooLarge(n)) if n == MAX_PAYLOAD + 1
        ));
        assert_eq!(
            encode_frame(FrameKind::Data, 1, &big[..MAX_PAYLOAD])
                .unwrap()
                .len(),
            MAX_FRAME_LEN
        );
    }

    #[test]
    fn kinds_round_trip() {
        for v in 0..=255u8 {
            if let Some(k) = FrameKind::from_u8(v) {
                assert_eq!(k as u8, v);
            }
        }
        assert_eq!(FrameKind::from_u8(11), Some(FrameKind::Ack));
        assert_eq!(FrameKind::from_u8(12), None);
    }
}
