//! Turns decoded frames into work: requests get a thread each, other host frames are routed to
//! the stream they belong to.

use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread;

use kiln_proto::{ErrorCode, Frame, FrameKind, Request, Response};

use crate::conn::{Inbound, Shared, Stream};
use crate::failure::Failure;
use crate::util::log;
use crate::{exec, files, netreset, procs, system, tarball, volumes, watch};

pub fn dispatch(shared: &Arc<Shared>, frame: Frame) {
    let msg = match frame.kind {
        FrameKind::Request => return request(shared, frame),
        FrameKind::Stdin => Inbound::Stdin(frame.payload),
        FrameKind::StdinClose => Inbound::StdinClose,
        FrameKind::Data => Inbound::Data(frame.payload),
        FrameKind::DataEnd => Inbound::DataEnd(
            <[u8; 8]>::try_from(frame.payload.as_slice())
                .ok()
                .map(u64::from_le_bytes),
        ),
        FrameKind::Cancel => Inbound::Cancel,
        // Agent → host kinds; a host never sends them.
        FrameKind::Response
        | FrameKind::Event
        | FrameKind::Stdout
        | FrameKind::Stderr
        | FrameKind::Ack => return,
    };
    shared.route(frame.stream, msg);
}

fn request(shared: &Arc<Shared>, frame: Frame) {
    let req: Request = match frame.json() {
        Ok(req) => req,
        Err(e) => {
            let f = Failure::new(ErrorCode::Protocol, format!("bad request: {e}"));
            return shared.reply(frame.stream, &f.into());
        }
    };
    match req {
        // Answered inline: cheap, and Hello must take effect before the next frame is read.
        Request::Hello => shared.new_session(frame.stream, &Response::Hello(system::hello_info())),
        Request::Ping => shared.reply(frame.stream, &Response::Pong),
        // Also inline: a few syscalls, sent once right after a restore, when a new thread costs the
        // guest more (cold code under TCG) than the work itself.
        Request::SetClock { secs, nanos } => {
            let r = system::set_clock(secs, nanos).unwrap_or_else(Response::from);
            shared.reply(frame.stream, &r)
        }
        Request::SetIdentity {
            secs,
            nanos,
            machine_id,
            hostname,
            entropy_hex,
            mac,
        } => {
            let r = system::set_identity(
                (secs, nanos),
                &machine_id,
                &hostname,
                &entropy_hex,
                mac.as_deref(),
            )
            .unwrap_or_else(Response::from);
            shared.reply(frame.stream, &r)
        }
        req => {
            let Some((stream, tx, rx)) = shared.open_stream(frame.stream) else {
                let f = Failure::new(
                    ErrorCode::Protocol,
                    format!("stream {} is already in use", frame.stream),
                );
                return shared.reply(frame.stream, &f.into());
            };
            let worker = Arc::clone(&stream);
            let spawned = thread::Builder::new()
                .name(format!("req-{}", frame.stream))
                .spawn(move || serve(&worker, tx, rx, req));
            if let Err(e) = spawned {
                log!("cannot start a thread: {e}");
                stream.finish(
                    &Failure::new(ErrorCode::Busy, format!("agent cannot start a thread: {e}"))
                        .into(),
                );
            }
        }
    }
}

fn serve(stream: &Arc<Stream>, tx: Sender<Inbound>, rx: Receiver<Inbound>, req: Request) {
    let result = match req {
        Request::Exec(req) => exec::run(stream, tx, rx, req),
        other => {
            // Only exec posts to its own inbox; dropping ours lets the others see the route close.
            drop(tx);
            serve_simple(stream, &rx, other)
        }
    };
    stream.finish(&result.unwrap_or_else(Response::from));
}

fn serve_simple(
    stream: &Stream,
    rx: &Receiver<Inbound>,
    req: Request,
) -> crate::failure::Result<Response> {
    match req {
        Request::ReadFile {
            path,
            offset,
            length,
        } => files::read_file(stream, rx, &path, offset, length),
        Request::WriteFile {
            path,
            mode,
            append,
            create_parents,
        } => files::write_file(rx, &|n| stream.ack(n), &path, mode, append, create_parents),
        Request::ListDir { path } => files::list_dir(&path),
        Request::Stat { path } => files::stat(&path).map(Response::Stat),
        Request::Mkdir {
            path,
            parents,
            mode,
        } => files::mkdir(&path, parents, mode),
        Request::Remove { path, recursive } => files::remove(&path, recursive),
        Request::Sync => system::sync_all(),
        Request::SetHostname { hostname } => system::set_hostname(&hostname),
        Request::Reseed { entropy_hex } => system::reseed(&entropy_hex),
        Request::SetMachineId { machine_id } => system::set_machine_id(&machine_id),
        Request::MountVolume {
            serial,
            path,
            read_only,
            rescan,
        } => volumes::mount(&serial, &path, read_only, rescan),
        Request::ReleaseVolumes { paths, serials } => volumes::release(&paths, &serials),
        Request::ProcStart(req) => procs::start(&req),
        Request::ProcList => Ok(procs::list()),
        Request::ProcAttach { pid, follow } => procs::attach(stream, rx, pid, follow),
        Request::ProcStdin {
            pid,
            data_hex,
            close,
        } => procs::write_stdin(pid, &data_hex, close),
        Request::ProcSignal { pid, signal } => procs::signal(pid, signal),
        Request::ProcWait { pid, timeout_ms } => procs::wait(pid, timeout_ms),
        Request::UnpackTar { path } => tarball::unpack(rx, &|n| stream.ack(n), &path),
        Request::PackTar { path } => tarball::pack(stream, rx, &path),
        Request::Watch { path, recursive } => watch::watch(stream, rx, &path, recursive),
        Request::ResetConnections { addresses } => netreset::reset_connections(&addresses),
        // Handled inline by `request`.
        Request::Hello
        | Request::Ping
        | Request::Exec(_)
        | Request::SetClock { .. }
        | Request::SetIdentity { .. } => {
            Err(Failure::new(ErrorCode::Protocol, "unexpected request"))
        }
    }
}
