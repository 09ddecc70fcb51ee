//! The kiln host ↔ guest-agent wire protocol: self-synchronising frames and the JSON messages
//! they carry. No I/O happens here. See `PROTOCOL.md` in this crate for the specification.

mod decoder;
mod frame;
mod message;

pub use decoder::{DecoderStats, FrameDecoder};
pub use frame::{
    encode_frame, encode_frame_into, encode_json, Frame, FrameKind, ACK_EVERY, DATA_CHUNK,
    HEADER_LEN, MAGIC, MAX_FRAME_LEN, MAX_PAYLOAD, SEND_WINDOW, TRAILER_LEN,
};
pub use message::{
    ChangeEvent, ChangeKind, DirEntry, ErrorCode, Event, ExecRequest, ExitStatus, FileKind,
    FileStat, HelloInfo, ProcInfo, ProcState, Request, Response,
};

/// Bumped on incompatible changes; reported in [`HelloInfo::protocol_version`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Errors from encoding or decoding messages.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("frame payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    PayloadTooLarge(usize),
    #[error("invalid JSON message: {0}")]
    Json(#[source] serde_json::Error),
}
