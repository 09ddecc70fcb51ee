//! kiln guest agent: serves the kiln-proto protocol on a virtio-serial port.
//!
//! One reader thread decodes frames, each request runs on its own thread, and all frames go
//! out through one mutex-guarded writer. See crates/kiln-proto/PROTOCOL.md.

mod conn;
mod dispatch;
mod exec;
mod failure;
mod files;
mod netreset;
mod port;
mod procs;
mod system;
mod tarball;
mod util;
mod volumes;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use kiln_proto::FrameDecoder;

use crate::conn::Shared;
use crate::port::{PortReader, ReadOutcome};
use crate::util::{log, RateLimit};

const USAGE: &str = "usage: kiln-agent [--port-name NAME] [--device PATH] [--connect-unix PATH]

  --port-name NAME     virtio-serial port to serve (default: kiln.agent)
  --device PATH        open this character device instead of looking the port up
  --connect-unix PATH  test mode: connect to a unix socket; exit when it closes";

/// While no host is connected the port reports hang-up at once; poll again after this.
const IDLE_POLL: Duration = Duration::from_millis(10);
/// A partial frame this old is abandoned once a complete frame is buffered behind it.
const STALE_FRAME: Duration = Duration::from_secs(1);

#[derive(Debug, PartialEq, Eq)]
enum Transport {
    Virtio {
        port_name: String,
        device: Option<PathBuf>,
    },
    Unix(PathBuf),
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Transport, String> {
    let mut port_name = "kiln.agent".to_string();
    let mut device = None;
    let mut unix = None;
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--port-name" => port_name = value("--port-name")?,
            "--device" => device = Some(PathBuf::from(value("--device")?)),
            "--connect-unix" => unix = Some(PathBuf::from(value("--connect-unix")?)),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(match unix {
        Some(path) => Transport::Unix(path),
        None => Transport::Virtio { port_name, device },
    })
}

fn main() -> ExitCode {
    let transport = match parse_args(std::env::args().skip(1)) {
        Ok(t) => t,
        Err(msg) if msg.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("kiln-agent: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let opened = match &transport {
        Transport::Virtio { port_name, device } => port::open_virtio(port_name, device.as_deref()),
        Transport::Unix(path) => port::connect_unix(path),
    };
    let (reader, writer) = match opened {
        Ok(pair) => pair,
        Err(e) => {
            log!("cannot open the host connection: {e}");
            return ExitCode::FAILURE;
        }
    };
    let serving = match &transport {
        Transport::Virtio {
            device: Some(d), ..
        } => d.display().to_string(),
        Transport::Virtio { port_name, .. } => format!("virtio port {port_name}"),
        Transport::Unix(path) => format!("unix socket {}", path.display()),
    };
    log!("version {} serving {serving}", env!("CARGO_PKG_VERSION"));
    let shared = Shared::new(writer);
    serve(reader, &shared, matches!(transport, Transport::Unix(_)));
    // Only the unix test mode gets here: don't leave the test's processes behind.
    shared.kill_all_groups();
    procs::kill_all();
    ExitCode::SUCCESS
}

/// Reads and dispatches frames until the host connection ends for good (unix mode only).
fn serve(mut reader: PortReader, shared: &std::sync::Arc<Shared>, exit_on_close: bool) {
    let mut decoder = FrameDecoder::with_stale_recovery(STALE_FRAME);
    let mut buf = vec![0u8; 64 * 1024];
    let mut connected = true;
    let mut resyncs = 0;
    let mut resync_log = RateLimit::new(Duration::from_secs(5));
    loop {
        match reader.read(&mut buf) {
            Ok(ReadOutcome::Data(n)) => {
                connected = true;
                decoder.push_at(&buf[..n], Instant::now());
                while let Some(frame) = decoder.next_frame() {
                    dispatch::dispatch(shared, frame);
                }
                let stats = decoder.stats();
                if stats.resyncs != resyncs && resync_log.ready() {
                    log!(
                        "resynchronised {} times ({} bytes skipped)",
                        stats.resyncs,
                        stats.skipped_bytes
                    );
                    resyncs = stats.resyncs;
                }
            }
            Ok(ReadOutcome::Closed) if exit_on_close => return,
            Ok(ReadOutcome::Closed) => {
                // The host went away (or was never there). Running requests keep going; a
                // partial frame from the old host must not swallow the next host's bytes.
                if connected {
                    decoder.reset();
                    connected = false;
                }
                thread::sleep(IDLE_POLL);
            }
            Err(e) => {
                log!("reading the host connection failed: {e}");
                if exit_on_close {
                    return;
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Transport, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn arguments() {
        assert_eq!(
            parse(&[]),
            Ok(Transport::Virtio {
                port_name: "kiln.agent".into(),
                device: None
            })
        );
        assert_eq!(
            parse(&["--port-name", "x", "--device", "/dev/vport0p1"]),
            Ok(Transport::Virtio {
                port_name: "x".into(),
                device: Some("/dev/vport0p1".into())
            })
        );
        assert_eq!(
            parse(&["--connect-unix", "/s"]),
            Ok(Transport::Unix("/s".into()))
        );
        assert!(parse(&["--device"]).is_err());
        assert!(parse(&["--bogus"]).is_err());
    }
}
