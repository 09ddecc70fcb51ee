//! JSON messages carried by `Request`, `Response` and `Event` frames.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Host → agent; opens a stream. Tagged by `"op"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Starts a new host session (see PROTOCOL.md) and answers [`Response::Hello`].
    Hello,
    /// Answers [`Response::Pong`].
    Ping,
    /// Runs a process: [`Event::Started`], `Stdout`/`Stderr` frames, then [`Response::Exit`].
    Exec(ExecRequest),
    /// [`Event::ReadStart`], `Data` frames, then [`Response::ReadDone`].
    ReadFile {
        path: String,
        #[serde(default)]
        offset: u64,
        /// Read at most this many bytes (default: to the end of the file).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        length: Option<u64>,
    },
    /// The host then sends `Data` frames and a `DataEnd`; answered by [`Response::Written`].
    WriteFile {
        path: String,
        /// Permission bits; default: those of the file being replaced, else 0o644.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<u32>,
        /// Append in place instead of atomically replacing the file.
        #[serde(default)]
        append: bool,
        #[serde(default)]
        create_parents: bool,
    },
    /// Answers [`Response::Entries`] (not following symlinks, sorted by name).
    ListDir { path: String },
    /// Answers [`Response::Stat`] (follows symlinks, except a dangling one).
    Stat { path: String },
    /// Answers [`Response::Ok`].
    Mkdir {
        path: String,
        #[serde(default)]
        parents: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mode: Option<u32>,
    },
    /// Answers [`Response::Ok`].
    Remove {
        path: String,
        #[serde(default)]
        recursive: bool,
    },
    /// Flushes all filesystems; answers [`Response::Ok`].
    Sync,
    /// Sets CLOCK_REALTIME; answers [`Response::Ok`].
    SetClock { secs: i64, nanos: u32 },
    /// Sets the kernel hostname and /etc/hostname; answers [`Response::Ok`].
    SetHostname { hostname: String },
    /// Mixes bytes into the kernel RNG, credits them and reseeds it; answers [`Response::Ok`].
    Reseed { entropy_hex: String },
    /// Writes /etc/machine-id (32 lowercase hex digits); answers [`Response::Ok`].
    SetMachineId { machine_id: String },
    /// A restored machine's new identity in one round trip (feature `identity`): sets the clock, then
    /// machine id, hostname and RNG entropy as the requests above do (the first failure is the answer),
    /// then `eth0`'s MAC if given; answers [`Response::Identity`].
    SetIdentity {
        secs: i64,
        nanos: u32,
        machine_id: String,
        hostname: String,
        entropy_hex: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mac: Option<String>,
    },
    /// Mounts the ext4 volume on the virtio disk with this serial at `path` (created if missing);
    /// answers [`Response::Ok`]. `rescan`: the disk's backend changed since the guest kernel probed it
    /// (a restored machine), so the driver is re-bound to read its size again first.
    MountVolume {
        serial: String,
        path: String,
        #[serde(default)]
        read_only: bool,
        #[serde(default)]
        rescan: bool,
    },
    /// Lazily unmounts each of `paths` (a volume that is no longer attached), then reports which of the
    /// disks with the given `serials` nobody holds any more; answers [`Response::Volumes`].
    ReleaseVolumes {
        paths: Vec<String>,
        serials: Vec<String>,
    },
    /// Starts a background process kept in the agent's process table (which outlives host
    /// connections, so snapshot copies carry it); answers [`Response::Proc`]. Needs feature `procs`.
    ProcStart(ExecRequest),
    /// Answers [`Response::Procs`]: running processes and recently finished ones.
    ProcList,
    /// Replays a background process's retained output, then (if `follow`) streams it live:
    /// [`Event::Attached`], `Stdout`/`Stderr` frames, then [`Response::Exit`] once it ended, or
    /// [`Response::Proc`] when not following and it still runs. `Cancel` detaches.
    ProcAttach {
        pid: u32,
        #[serde(default)]
        follow: bool,
    },
    /// Writes hex-encoded bytes to its stdin, then closes stdin if `close`; answers [`Response::Ok`].
    ProcStdin {
        pid: u32,
        #[serde(default)]
        data_hex: String,
        #[serde(default)]
        close: bool,
    },
    /// Sends `signal` to its process group; answers [`Response::Ok`].
    ProcSignal { pid: u32, signal: i32 },
    /// Waits up to `timeout_ms` for it to end; answers [`Response::Proc`] either way.
    ProcWait { pid: u32, timeout_ms: u64 },
    /// Unpacks a tar stream under `path` (created if missing): the host sends it in `Data` frames
    /// and a `DataEnd`; answered by [`Response::Unpacked`]. Every entry must stay inside `path`
    /// (no `..`, no absolute names, never through a symlink), else [`ErrorCode::PathEscape`].
    /// Needs feature `tar`.
    UnpackTar { path: String },
    /// Streams a tar of the tree at `path` (symlinks stored as symlinks): [`Event::ReadStart`]
    /// (size 0), `Data` frames, then [`Response::ReadDone`]. Needs feature `tar`.
    PackTar { path: String },
    /// Watches a directory with inotify: [`Event::Watching`], then one [`Event::Change`] per
    /// change until the host sends `Cancel` (answered by [`Response::Ok`]). Needs feature `watch`.
    Watch {
        path: String,
        #[serde(default)]
        recursive: bool,
    },
    /// Aborts (with a TCP reset) the guest's TCP connections whose local address is one of
    /// `addresses`, addresses a re-addressed copy no longer has; answers [`Response::Reset`].
    /// Needs feature `net_reset`.
    ResetConnections { addresses: Vec<String> },
}

/// A process to run. Give exactly one of `argv` or `shell`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH` (the one in `env` if set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    /// A command line for `/bin/sh -c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// Merged over `PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`, `HOME=/root`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// If true the host sends `Stdin` frames and a `StdinClose`; otherwise stdin is /dev/null.
    #[serde(default)]
    pub stdin: bool,
    /// Kill the process group after this long and report `timed_out`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Run as this user (a name from the guest's /etc/passwd, or a numeric uid) instead of root.
    /// Agents without feature `user` ignore it, so hosts check the feature first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl ExecRequest {
    /// Runs `argv` directly.
    pub fn argv<I, S>(argv: I) -> ExecRequest
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            argv: Some(argv.into_iter().map(Into::into).collect()),
            ..ExecRequest::default()
        }
    }

    /// Runs `command` with `/bin/sh -c`.
    pub fn shell(command: impl Into<String>) -> ExecRequest {
        ExecRequest {
            shell: Some(command.into()),
            ..ExecRequest::default()
        }
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> ExecRequest {
        self.env.insert(key.into(), value.into());
        self
    }

    pub fn cwd(mut self, cwd: impl Into<String>) -> ExecRequest {
        self.cwd = Some(cwd.into());
        self
    }

    pub fn with_stdin(mut self) -> ExecRequest {
        self.stdin = true;
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> ExecRequest {
        self.timeout_ms = Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        self
    }
}

/// Agent → host; the final frame of a stream. Tagged by `"type"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Hello(HelloInfo),
    Pong,
    Exit(ExitStatus),
    Stat(FileStat),
    /// All requested bytes were sent in `Data` frames.
    ReadDone {
        bytes: u64,
    },
    /// The file now holds the `bytes` received.
    Written {
        bytes: u64,
    },
    Entries {
        entries: Vec<DirEntry>,
    },
    Ok,
    /// Disks (by serial) that no filesystem or process holds open.
    Volumes {
        free: Vec<String>,
    },
    /// Answer to `set_identity`: everything but the MAC is set; `mac_error` says why the MAC is not.
    Identity {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mac_error: Option<String>,
    },
    /// One background process.
    Proc(ProcInfo),
    Procs {
        procs: Vec<ProcInfo>,
    },
    /// A tar stream was unpacked: `entries` entries from `bytes` bytes of tar.
    Unpacked {
        entries: u64,
        bytes: u64,
    },
    /// Answer to `reset_connections`: how many connections were aborted.
    Reset {
        connections: u32,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// Agent → host; intermediate. Tagged by `"type"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The process was spawned (in its own process group, whose id is `pid`).
    Started { pid: u32 },
    /// Sent before the `Data` frames of a `ReadFile`: the file's size and permission bits.
    ReadStart { size: u64, mode: u32 },
    /// First frame of a `ProcAttach`: `dropped` bytes of output were pushed out of the
    /// process's ring before the replay starts.
    Attached { pid: u32, dropped: u64 },
    /// A `Watch` is in place; changes from now on are reported.
    Watching,
    /// One change under a watched directory.
    Change(ChangeEvent),
}

/// What happened to a watched path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Create,
    Modify,
    Delete,
    /// Renamed away; the matching `MovedTo` carries the same `cookie`.
    MovedFrom,
    MovedTo,
    /// The kernel's event queue overflowed: changes were lost, re-list to catch up.
    Overflow,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeEvent {
    pub change: ChangeKind,
    /// Absolute guest path (the watched directory for `overflow`).
    pub path: String,
    #[serde(default)]
    pub dir: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<u32>,
}

/// Whether a background process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcState {
    Running,
    Exited,
}

/// A background process in the agent's table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcInfo {
    /// Also its process group id.
    pub pid: u32,
    /// The argv, or `sh -c` and the command line.
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub state: ProcState,
    /// How it ended, once `state` is `exited`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitStatus>,
    /// Output bytes produced so far (stdout and stderr together).
    pub output_bytes: u64,
    /// Of those, bytes pushed out of the bounded ring (lost to late readers).
    pub dropped_bytes: u64,
    /// Guest uptime when it started.
    pub started_uptime_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloInfo {
    pub agent_version: String,
    pub protocol_version: u32,
    /// The guest kernel's boot id; changes on reboot but not on snapshot restore.
    pub boot_id: String,
    pub hostname: String,
    /// Time since guest boot (CLOCK_BOOTTIME).
    pub uptime_ms: u64,
    /// The agent's pid.
    pub pid: u32,
    /// Optional capabilities beyond protocol version 1 (`procs`, `user`); absent from older agents.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, if it exited normally.
    pub code: Option<i32>,
    /// Terminating signal, if it was killed.
    pub signal: Option<i32>,
    /// Killed because its `timeout_ms` passed.
    pub timed_out: bool,
    pub duration_ms: u64,
}

impl ExitStatus {
    /// Exited with code 0 (and did not time out).
    pub fn success(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub kind: FileKind,
    /// Modification time, seconds since the epoch.
    pub mtime_unix: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    pub mode: u32,
    pub mtime_unix: i64,
}

/// Why a request failed. Unknown codes from newer agents decode as `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    NotFound,
    PermissionDenied,
    AlreadyExists,
    NotADirectory,
    IsADirectory,
    DirectoryNotEmpty,
    NoSpace,
    InvalidArgument,
    Io,
    Timeout,
    ExecFailed,
    Busy,
    Cancelled,
    Unsupported,
    /// The request could not be decoded or broke the stream rules.
    Protocol,
    /// A path (e.g. a tar entry) would land outside the directory it is confined to.
    PathEscape,
    #[serde(other)]
    Other,
}

impl ErrorCode {
    /// The snake_case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::NotADirectory => "not_a_directory",
            ErrorCode::IsADirectory => "is_a_directory",
            ErrorCode::DirectoryNotEmpty => "directory_not_empty",
            ErrorCode::NoSpace => "no_space",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::Io => "io",
            ErrorCode::Timeout => "timeout",
            ErrorCode::ExecFailed => "exec_failed",
            ErrorCode::Busy => "busy",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Protocol => "protocol",
            ErrorCode::PathEscape => "path_escape",
            ErrorCode::Other => "other",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn round_trip<T>(v: &T) -> serde_json::Value
    where
        T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug,
    {
        let text = serde_json::to_string(v).unwrap();
        let back: T = serde_json::from_str(&text).unwrap();
        assert_eq!(&back, v);
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn requests_round_trip() {
        let reqs = vec![
            Request::Hello,
            Request::Ping,
            Request::Exec(
                ExecRequest::argv(["ls", "-l"])
                    .env("A", "b")
                    .cwd("/tmp")
                    .timeout(Duration::from_secs(2)),
            ),
            Request::Exec(ExecRequest::shell("echo hi").with_stdin()),
            Request::ReadFile {
                path: "/etc/os-release".into(),
                offset: 10,
                length: Some(5),
            },
            Request::WriteFile {
                path: "/tmp/x".into(),
                mode: Some(0o600),
                append: false,
                create_parents: true,
            },
            Request::ListDir { path: "/".into() },
            Request::Stat { path: "/".into() },
            Request::Mkdir {
                path: "/a/b".into(),
                parents: true,
                mode: None,
            },
            Request::Remove {
                path: "/a".into(),
                recursive: true,
            },
            Request::Sync,
            Request::SetClock {
                secs: -5,
                nanos: 999_999_999,
            },
            Request::SetHostname {
                hostname: "box".into(),
            },
            Request::Reseed {
                entropy_hex: "00ff".into(),
            },
            Request::SetMachineId {
                machine_id: "0123456789abcdef0123456789abcdef".into(),
            },
            Request::UnpackTar { path: "/d".into() },
            Request::PackTar { path: "/d".into() },
            Request::Watch {
                path: "/d".into(),
                recursive: true,
            },
            Request::SetIdentity {
                secs: 1,
                nanos: 2,
                machine_id: "0123456789abcdef0123456789abcdef".into(),
                hostname: "box".into(),
                entropy_hex: "00ff".into(),
                mac: Some("52:54:00:12:34:56".into()),
            },
        ];
        for r in &reqs {
            round_trip(r);
        }
    }

    #[test]
    fn request_wire_shape() {
        let v = round_trip(&Request::Exec(ExecRequest::argv(["true"])));
        assert_eq!(
            v,
            json!({"op": "exec", "argv": ["true"], "env": {}, "stdin": false})
        );
        assert_eq!(round_trip(&Request::Ping), json!({"op": "ping"}));
        let v = round_trip(&Request::SetMachineId {
            machine_id: "x".into(),
        });
        assert_eq!(v, json!({"op": "set_machine_id", "machine_id": "x"}));
    }

    #[test]
    fn optional_fields_default() {
        let r: Request = serde_json::from_str(r#"{"op":"read_file","path":"/x"}"#).unwrap();
        assert_eq!(
            r,
            Request::ReadFile {
                path: "/x".into(),
                offset: 0,
                length: None
            }
        );
        let r: Request = serde_json::from_str(r#"{"op":"exec","shell":"true"}"#).unwrap();
        assert_eq!(r, Request::Exec(ExecRequest::shell("true")));
        assert!(serde_json::from_str::<Request>(r#"{"op":"nope"}"#).is_err());
    }

    #[test]
    fn responses_and_events_round_trip() {
        let resps = vec![
            Response::Hello(HelloInfo {
                agent_version: "0.1.0".into(),
                protocol_version: 1,
                boot_id: "b".into(),
                hostname: "h".into(),
                uptime_ms: 5,
                pid: 42,
                features: vec!["procs".into()],
            }),
            Response::Pong,
            Response::Exit(ExitStatus {
                code: None,
                signal: Some(9),
                timed_out: true,
                duration_ms: 1000,
            }),
            Response::Stat(FileStat {
                size: 1,
                mode: 0o755,
                kind: FileKind::Dir,
                mtime_unix: -1,
            }),
            Response::ReadDone { bytes: 9 },
            Response::Written { bytes: 9 },
            Response::Entries {
                entries: vec![DirEntry {
                    name: "a".into(),
                    kind: FileKind::Symlink,
                    size: 3,
                    mode: 0o777,
                    mtime_unix: 0,
                }],
            },
            Response::Ok,
            Response::Error {
                code: ErrorCode::NotFound,
                message: "no such file: /x".into(),
            },
        ];
        for r in &resps {
            round_trip(r);
        }
        round_trip(&Event::Started { pid: 7 });
        round_trip(&Response::Unpacked {
            entries: 2,
            bytes: 3072,
        });
        let v = round_trip(&Event::Change(ChangeEvent {
            change: ChangeKind::MovedTo,
            path: "/d/x".into(),
            dir: false,
            cookie: Some(4),
        }));
        assert_eq!(
            v,
            json!({"type": "change", "change": "moved_to", "path": "/d/x", "dir": false, "cookie": 4})
        );
        let v = round_trip(&Event::ReadStart {
            size: 3,
            mode: 0o644,
        });
        assert_eq!(v, json!({"type": "read_start", "size": 3, "mode": 0o644}));
        let v = round_trip(&Response::Error {
            code: ErrorCode::IsADirectory,
            message: "m".into(),
        });
        assert_eq!(
            v,
            json!({"type": "error", "code": "is_a_directory", "message": "m"})
        );
    }

    #[test]
    fn error_codes_match_their_names_and_unknown_is_other() {
        for code in [
            ErrorCode::NotFound,
            ErrorCode::DirectoryNotEmpty,
            ErrorCode::ExecFailed,
            ErrorCode::Other,
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), json!(code.as_str()));
        }
        let c: ErrorCode = serde_json::from_str(r#""brand_new_code""#).unwrap();
        assert_eq!(c, ErrorCode::Other);
    }

    #[test]
    fn exit_status_success() {
        let ok = ExitStatus {
            code: Some(0),
            signal: None,
            timed_out: false,
            duration_ms: 1,
        };
        assert!(ok.success());
        assert!(!ExitStatus {
            code: Some(1),
            ..ok
        }
        .success());
        assert!(!ExitStatus {
            code: None,
            signal: Some(15),
            ..ok
        }
        .success());
    }
}
