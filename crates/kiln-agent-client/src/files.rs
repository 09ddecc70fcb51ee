//! Reading and writing guest files.

use std::time::Duration;

use bytes::Bytes;
use kiln_proto::{Event, FrameKind, Request, Response, DATA_CHUNK};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::conn::StreamRx;
use crate::{final_response, parse_response, unexpected, AgentClient, AgentError, REQUEST_TIMEOUT};

/// A transfer stalls this long without a chunk before it is given up.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(60);

/// A file being read from the guest, chunk by chunk. Dropping it early cancels the read.
pub struct FileDownload {
    /// The file's size when the read started.
    pub size: u64,
    /// The file's permission bits.
    pub mode: u32,
    client: AgentClient,
    stream: StreamRx,
    received: u64,
    finished: bool,
}

impl AgentClient {
    /// Starts reading a whole file; fails early if it cannot be opened.
    pub async fn read_file(&self, path: &str) -> Result<FileDownload, AgentError> {
        self.read_file_range(path, 0, None).await
    }

    /// Starts reading at most `length` bytes of a file from `offset` on.
    pub async fn read_file_range(
        &self,
        path: &str,
        offset: u64,
        length: Option<u64>,
    ) -> Result<FileDownload, AgentError> {
        let req = Request::ReadFile {
            path: path.into(),
            offset,
            length,
        };
        self.start_download(&req, "read_file").await
    }

    /// Sends a request answered by `ReadStart`, `Data` frames and `ReadDone`.
    pub(crate) async fn start_download(
        &self,
        req: &Request,
        what: &str,
    ) -> Result<FileDownload, AgentError> {
        let mut stream = self.conn.request(req).await?;
        let first = tokio::time::timeout(REQUEST_TIMEOUT, stream.recv())
            .await
            .map_err(|_| AgentError::timeout("the guest agent to open the file", REQUEST_TIMEOUT))?
            .ok_or(AgentError::Disconnected)?;
        let (size, mode) = match first.kind {
            FrameKind::Event => match first.json::<Event>() {
                Ok(Event::ReadStart { size, mode }) => (size, mode),
                other => {
                    return Err(AgentError::Protocol(format!(
                        "unexpected read event: {other:?}"
                    )))
                }
            },
            FrameKind::Response => {
                let resp = parse_response(&first)?;
                return Err(unexpected(what, &resp));
            }
            kind => {
                return Err(AgentError::Protocol(format!(
                    "unexpected first read frame: {kind:?}"
                )))
            }
        };
        Ok(FileDownload {
            size,
            mode,
            client: self.clone(),
            stream,
            received: 0,
            finished: false,
        })
    }

    pub async fn read_file_to_vec(&self, path: &str) -> Result<Vec<u8>, AgentError> {
        let mut download = self.read_file(path).await?;
        // The size is a hint (files can change, /proc files claim 0); cap the reservation.
        let mut out = Vec::with_capacity(usize::try_from(download.size.min(64 << 20)).unwrap_or(0));
        while let Some(chunk) = download.next_chunk().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    /// Writes `body` to a guest file, atomically replacing it; returns the bytes written.
    /// `mode` defaults to the replaced file's mode, else 0o644.
    pub async fn write_file<R: AsyncRead + Unpin + Send>(
        &self,
        path: &str,
        mode: Option<u32>,
        create_parents: bool,
        body: R,
    ) -> Result<u64, AgentError> {
        self.write_file_with(path, mode, create_parents, false, body)
            .await
    }

    /// Writes `data` into the existing file at `path` in place (no temporary file, no rename), as a
    /// kernel attribute in /sys needs.
    pub async fn append_file(&self, path: &str, data: &[u8]) -> Result<u64, AgentError> {
        self.write_file_with(path, None, false, true, data).await
    }

    async fn write_file_with<R: AsyncRead + Unpin + Send>(
        &self,
        path: &str,
        mode: Option<u32>,
        create_parents: bool,
        append: bool,
        body: R,
    ) -> Result<u64, AgentError> {
        let req = Request::WriteFile {
            path: path.into(),
            mode,
            append,
            create_parents,
        };
        match self.send_body(&req, body, "write_file").await? {
            (Response::Written { bytes }, total) if bytes == total => Ok(bytes),
            (other, _) => Err(unexpected("write_file", &other)),
        }
    }

    /// Sends a request followed by `body` as flow-controlled `Data` frames and a `DataEnd`; returns
    /// the agent's final response (an error response is an `Err`) and the bytes sent.
    pub(crate) async fn send_body<R: AsyncRead + Unpin + Send>(
        &self,
        req: &Request,
        mut body: R,
        what: &str,
    ) -> Result<(Response, u64), AgentError> {
        let mut stream = self.conn.request(req).await?;
        let mut buf = vec![0u8; DATA_CHUNK];
        let mut total = 0u64;
        loop {
            // The agent answers early if it cannot write (missing parent, disk full, ...).
            if let Some(frame) = stream.try_recv() {
                if frame.kind == FrameKind::Response {
                    let resp = parse_response(&frame)?;
                    return Err(unexpected(what, &resp));
                }
            }
            let n = match read_chunk(&mut body, &mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    let _ = self
                        .conn
                        .send_frame(FrameKind::Cancel, stream.id, &[])
                        .await;
                    return Err(AgentError::Io(e));
                }
            };
            if n == 0 {
                break;
            }
            if !stream.window.reserve(total, n as u64).await {
                // The agent answered early (an error), or the connection is gone.
                let resp = final_response(&mut stream).await?;
                return Err(unexpected(what, &resp));
            }
            self.conn
                .send_frame(FrameKind::Data, stream.id, &buf[..n])
                .await?;
            total += n as u64;
        }
        self.conn
            .send_frame(FrameKind::DataEnd, stream.id, &total.to_le_bytes())
            .await?;
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, final_response(&mut stream))
            .await
            .map_err(|_| {
                AgentError::timeout("the guest agent to finish writing", REQUEST_TIMEOUT)
            })??;
        Ok((resp, total))
    }
}

impl FileDownload {
    /// The next chunk; `None` once the whole file arrived.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, AgentError>> {
        while !self.finished {
            let frame = match tokio::time::timeout(CHUNK_TIMEOUT, self.stream.recv()).await {
                Ok(Some(frame)) => frame,
                Ok(None) if self.stream.window.overrun() => {
                    let err = AgentError::Overrun {
                        after: crate::conn::STALL_LIMIT,
                    };
                    return Some(Err(self.fail(err)));
                }
                Ok(None) => return Some(Err(self.fail(AgentError::Disconnected))),
                Err(_) => {
                    let err = AgentError::timeout("the next chunk of a guest file", CHUNK_TIMEOUT);
                    return Some(Err(self.fail(err)));
                }
            };
            match frame.kind {
                FrameKind::Data => {
                    self.received += frame.payload.len() as u64;
                    return Some(Ok(Bytes::from(frame.payload)));
                }
                FrameKind::Response => {
                    self.finished = true;
                    return match parse_response(&frame) {
                        Ok(Response::ReadDone { bytes }) if bytes == self.received => None,
                        Ok(Response::ReadDone { bytes }) => Some(Err(AgentError::Protocol(
                            format!("the guest sent {bytes} bytes but {} arrived", self.received),
                        ))),
                        Ok(other) => Some(Err(unexpected("read_file", &other))),
                        Err(e) => Some(Err(e)),
                    };
                }
                _ => {}
            }
        }
        None
    }

    fn fail(&mut self, err: AgentError) -> AgentError {
        self.finished = true;
        err
    }
}

impl Drop for FileDownload {
    fn drop(&mut self) {
        if !self.finished {
            self.client
                .conn
                .try_send_frame(FrameKind::Cancel, self.stream.id, &[]);
        }
    }
}

/// Fills `buf` as far as the reader allows, so frames are full-sized.
async fn read_chunk<R: AsyncRead + Unpin>(body: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match body.read(&mut buf[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}
