//! Whole directories: tar streams in and out, and inotify watches.

use kiln_proto::{ChangeEvent, ErrorCode, Event, FrameKind, Request, Response};
use tokio::io::AsyncRead;

use crate::conn::StreamRx;
use crate::{parse_response, unexpected, AgentClient, AgentError, FileDownload, REQUEST_TIMEOUT};

/// A directory watch in the guest. Dropping it cancels the watch there.
pub struct FileWatch {
    client: AgentClient,
    stream: StreamRx,
    finished: bool,
}

impl AgentClient {
    fn need_feature(&self, feature: &str, what: &str) -> Result<(), AgentError> {
        if self.has_feature(feature) {
            return Ok(());
        }
        Err(AgentError::Guest {
            code: ErrorCode::Unsupported,
            message: format!("this sandbox's guest agent predates {what}; rebuild the image (kiln image build --force) and create the sandbox again"),
        })
    }

    /// Unpacks the tar stream `body` under the guest directory `path` (created if missing); returns
    /// the number of entries and tar bytes.
    pub async fn unpack_tar<R: AsyncRead + Unpin + Send>(
        &self,
        path: &str,
        body: R,
    ) -> Result<(u64, u64), AgentError> {
        self.need_feature("tar", "directory uploads")?;
        let req = Request::UnpackTar { path: path.into() };
        match self.send_body(&req, body, "unpack_tar").await? {
            (Response::Unpacked { entries, bytes }, total) if bytes == total => {
                Ok((entries, bytes))
            }
            (other, _) => Err(unexpected("unpack_tar", &other)),
        }
    }

    /// Starts streaming a tar of the guest directory `path` (its `size` is 0: unknown up front).
    pub async fn pack_tar(&self, path: &str) -> Result<FileDownload, AgentError> {
        self.need_feature("tar", "directory downloads")?;
        self.start_download(&Request::PackTar { path: path.into() }, "pack_tar")
            .await
    }

    /// Starts watching the guest directory `path`; returns once the watch is in place.
    pub async fn watch(&self, path: &str, recursive: bool) -> Result<FileWatch, AgentError> {
        self.need_feature("watch", "directory watches")?;
        let req = Request::Watch {
            path: path.into(),
            recursive,
        };
        let mut stream = self.conn.request(&req).await?;
        let first = match tokio::time::timeout(REQUEST_TIMEOUT, stream.recv()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => return Err(AgentError::Disconnected),
            Err(_) => {
                self.conn.try_send_frame(FrameKind::Cancel, stream.id, &[]);
                let what = "the guest agent to start the watch";
                return Err(AgentError::timeout(what, REQUEST_TIMEOUT));
            }
        };
        match first.kind {
            FrameKind::Event if matches!(first.json::<Event>(), Ok(Event::Watching)) => {
                Ok(FileWatch {
                    client: self.clone(),
                    stream,
                    finished: false,
                })
            }
            FrameKind::Response => {
                let resp = parse_response(&first)?;
                Err(unexpected("watch", &resp))
            }
            kind => {
                self.conn.try_send_frame(FrameKind::Cancel, stream.id, &[]);
                Err(AgentError::Protocol(format!(
                    "unexpected first watch frame: {kind:?}"
                )))
            }
        }
    }
}

impl FileWatch {
    /// The next change; `None` once the watch ended (the directory was removed).
    pub async fn next(&mut self) -> Option<Result<ChangeEvent, AgentError>> {
        while !self.finished {
            let Some(frame) = self.stream.recv().await else {
                self.finished = true;
                let err = if self.stream.window.overrun() {
                    AgentError::Overrun {
                        after: crate::conn::STALL_LIMIT,
                    }
                } else {
                    AgentError::Disconnected
                };
                return Some(Err(err));
            };
            match frame.kind {
                FrameKind::Event => match frame.json::<Event>() {
                    Ok(Event::Change(change)) => return Some(Ok(change)),
                    Ok(_) => {}
                    Err(e) => return Some(Err(AgentError::Protocol(e.to_string()))),
                },
                FrameKind::Response => {
                    self.finished = true;
                    return match parse_response(&frame) {
                        Ok(Response::Ok) => None,
                        Ok(other) => Some(Err(unexpected("watch", &other))),
                        Err(e) => Some(Err(e)),
                    };
                }
                _ => {}
            }
        }
        None
    }
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        if !self.finished {
            self.client
                .conn
                .try_send_frame(FrameKind::Cancel, self.stream.id, &[]);
        }
    }
}
