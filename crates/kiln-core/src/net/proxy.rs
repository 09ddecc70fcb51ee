//! Published ports under bridged networking: the daemon listens on `127.0.0.1:HOST` and relays each
//! connection to the guest's own address (user networking has QEMU do it with `hostfwd`).
//!
//! A listener belongs to a sandbox and guest port; it stays bound while the sandbox is stopped (a
//! connection then fails at once) and goes when the port is unpublished or the sandbox deleted. A
//! restarted daemon binds the recorded ports of its running sandboxes again (`Engine::adopt`).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How long a relayed connection waits for the guest to accept it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

struct Published {
    host: u16,
    target: SocketAddrV4,
    task: JoinHandle<()>,
}

#[derive(Default)]
pub struct Proxies {
    by_port: Mutex<HashMap<(String, u16), Published>>,
}

impl Proxies {
    /// Relays `127.0.0.1:host` (0: any free port) to `guest:port`; returns the host port, or None when
    /// `host` is taken. Publishing what is already published (same sandbox and guest port, same or any
    /// host port) keeps the listener and points it at `guest`.
    pub fn publish(
        &self,
        sandbox: &str,
        guest: Ipv4Addr,
        port: u16,
        host: u16,
    ) -> std::io::Result<Option<u16>> {
        let key = (sandbox.to_string(), port);
        let target = SocketAddrV4::new(guest, port);
        let mut map = self.by_port.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = map.get(&key) {
            if (host == 0 || host == p.host) && p.target == target {
                return Ok(Some(p.host));
            }
        }
        if let Some(old) = map.remove(&key) {
            old.task.abort();
        }
        let std_listener = match std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, host)) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => return Ok(None),
            Err(e) => return Err(e),
        };
        std_listener.set_nonblocking(true)?;
        let bound = std_listener.local_addr()?.port();
        let listener = TcpListener::from_std(std_listener)?;
        let task = tokio::spawn(relay(listener, target));
        map.insert(
            key,
            Published {
                host: bound,
                target,
                task,
            },
        );
        Ok(Some(bound))
    }

    pub fn unpublish(&self, sandbox: &str, port: u16) {
        let mut map = self.by_port.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = map.remove(&(sandbox.to_string(), port)) {
            p.task.abort();
        }
    }

    pub fn unpublish_all(&self, sandbox: &str) {
        let mut map = self.by_port.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|(s, _), p| {
            if s == sandbox {
                p.task.abort();
            }
            s != sandbox
        });
    }
}

async fn relay(listener: TcpListener, target: SocketAddrV4) {
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        tokio::spawn(async move {
            let Ok(Ok(mut guest)) =
                tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await
            else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut client, &mut guest).await;
        });
    }
}
