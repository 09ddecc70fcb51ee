//! Published ports: guest TCP ports forwarded from 127.0.0.1 on the host.
//!
//! Forwards are added to a running QEMU through QMP (kiln_vmm::hostfwd) after every launch (create, start,
//! resume, fork, restore) and by `publish`; the host port each got is recorded in the sandbox's row, so
//! they survive a daemon restart (the QEMU keeps them) and a stop/start (re-applied at launch). A port asked
//! for without a host port is bound by QEMU on port 0, so the kernel picks a free one and no other process
//! can take it in between. Such an `auto` port tries its recorded host port first on a later launch, and
//! takes another one if that is in use; a fixed host port in use is `port_in_use`. Copies (resume, fork)
//! publish the source's guest ports on host ports of their own.

use kiln_vmm::Qmp;

use crate::engine::{Engine, Locked};
use crate::error::{Error, ErrorCode, Result};
use crate::model::{PortMapping, PortRequest, Sandbox, SandboxState};
use crate::vm::Vm;

/// Ports a sandbox may publish.
pub const MAX_PORTS: usize = 32;

fn in_use(host: u16, guest: u16) -> Error {
    Error::new(
        ErrorCode::PortInUse,
        format!(
            "host port {host} (127.0.0.1) is in use, so guest port {guest} cannot be published on it; pick another host port, or leave it out to have a free one picked"
        ),
    )
}

/// Checks what a client asks to publish (on create, or with one more port) and turns it into mappings
/// (host 0: to be picked at launch).
pub(crate) fn requested(existing: &[PortMapping], req: &[PortRequest]) -> Result<Vec<PortMapping>> {
    let mut out = existing.to_vec();
    for r in req {
        if r.guest == 0 || r.host == Some(0) {
            return Err(Error::invalid(format!(
                "invalid port {}: ports are 1-65535; leave 'host' out to have a free host port picked",
                if r.guest == 0 { 0 } else { r.host.unwrap_or(0) }
            )));
        }
        if let Some(p) = out.iter().find(|p| p.guest == r.guest) {
            return Err(Error::new(
                ErrorCode::PortInUse,
                format!(
                    "guest port {} is already published (on 127.0.0.1:{}); unpublish it first",
                    r.guest, p.host
                ),
            ));
        }
        if let Some(h) = r.host.filter(|h| existing.iter().any(|p| p.host == *h)) {
            return Err(in_use(h, r.guest));
        }
        if let Some(h) = r.host.filter(|h| out.iter().any(|p| p.host == *h)) {
            return Err(Error::invalid(format!(
                "host port {h} is given twice; each host port forwards to one guest port"
            )));
        }
        out.push(PortMapping {
            host: r.host.unwrap_or(0),
            guest: r.guest,
            auto: r.host.is_none(),
        });
    }
    if out.len() > MAX_PORTS {
        return Err(Error::invalid(format!(
            "a sandbox publishes at most {MAX_PORTS} ports"
        )));
    }
    Ok(out)
}

impl Engine {
    /// Refuses fixed host ports another sandbox has recorded (running or not: a stopped one takes its
    /// ports back when it starts). The bind itself settles a race between two requests for the same port.
    pub(crate) fn check_host_ports_free(&self, own: &str, ports: &[PortMapping]) -> Result<()> {
        let others = self.db().list_sandboxes()?;
        for p in ports.iter().filter(|p| !p.auto && p.host != 0) {
            if let Some(o) = others
                .iter()
                .find(|o| o.id != own && o.ports.iter().any(|q| q.host == p.host))
            {
                return Err(Error::new(
                    ErrorCode::PortInUse,
                    format!(
                        "host port {} is published by sandbox {}; pick another host port, or leave it out to have a free one picked",
                        p.host, o.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Adds one forward to a running QEMU: the recorded host port, or (auto ports) any free one.
    async fn forward(&self, qmp: &Qmp, p: PortMapping) -> Result<PortMapping> {
        if p.host != 0 {
            if let Some(host) = kiln_vmm::hostfwd::add(qmp, p.host, p.guest).await? {
                return Ok(PortMapping { host, ..p });
            }
            if !p.auto {
                return Err(in_use(p.host, p.guest));
            }
        }
        match kiln_vmm::hostfwd::add(qmp, 0, p.guest).await? {
            Some(host) => Ok(PortMapping { host, ..p }),
            None => Err(Error::internal(format!(
                "QEMU could not bind any free host port for guest port {}",
                p.guest
            ))),
        }
    }

    /// Under bridged networking: the daemon relays the port to the guest's address (net/proxy.rs).
    pub(crate) fn forward_bridged(
        &self,
        br: &crate::net::Bridge,
        sb: &Sandbox,
        p: PortMapping,
    ) -> Result<PortMapping> {
        let address = self
            .db()
            .find_sandbox(&sb.id)?
            .filter(|s| s.id == sb.id)
            .and_then(|s| s.address)
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| {
                Error::internal(format!(
                    "sandbox {} has no address to publish ports on",
                    sb.id
                ))
            })?;
        let bind = |host| {
            br.proxies
                .publish(&sb.id, address, p.guest, host)
                .map_err(|e| Error::internal(format!("cannot listen on 127.0.0.1:{host}: {e}")))
        };
        if p.host != 0 {
            if let Some(host) = bind(p.host)? {
                return Ok(PortMapping { host, ..p });
            }
            if !p.auto {
                return Err(in_use(p.host, p.guest));
            }
        }
        match bind(0)? {
            Some(host) => Ok(PortMapping { host, ..p }),
            None => Err(Error::internal("no free host port to publish on")),
        }
    }

    /// Publishes a just-launched VM's ports and records the host ports they got.
    pub(crate) async fn apply_ports(&self, sb: &Sandbox, vm: &Vm) -> Result<()> {
        if sb.ports.is_empty() {
            return Ok(());
        }
        let mut got = Vec::with_capacity(sb.ports.len());
        if let Some(br) = self.bridge() {
            for p in &sb.ports {
                got.push(self.forward_bridged(br, sb, *p)?);
            }
        } else {
            let qmp = vm.qmp().await?;
            for p in &sb.ports {
                got.push(self.forward(&qmp, *p).await?);
            }
        }
        if got != sb.ports {
            self.db().set_ports(&sb.id, &got)?;
        }
        Ok(())
    }

    /// Publishes a guest port of a running (or paused) sandbox; returns the mapping. Asking again for a
    /// published guest port (without a host port, or with the one it has) returns it as it is.
    pub async fn publish_port(&self, id_or_name: &str, req: PortRequest) -> Result<PortMapping> {
        self.wake_for_use(id_or_name).await?;
        let Locked { sb, _guard, .. } = self.lock_sandbox(id_or_name).await?;
        if let Some(p) = sb.ports.iter().find(|p| p.guest == req.guest) {
            if req.host.is_none_or(|h| h == p.host) {
                return Ok(*p);
            }
        }
        let ports = requested(&sb.ports, &[req])?;
        let Some(new) = ports.last().copied() else {
            return Err(Error::internal("no port to publish"));
        };
        self.require_state(&sb, &[SandboxState::Running, SandboxState::Paused])?;
        self.check_host_ports_free(&sb.id, &ports)?;
        if let Some(br) = self.bridge() {
            let got = self.forward_bridged(br, &sb, new)?;
            let mut all = sb.ports.clone();
            all.push(got);
            if let Err(e) = self.db().set_ports(&sb.id, &all) {
                br.proxies.unpublish(&sb.id, got.guest);
                return Err(e);
            }
            tracing::info!(sandbox = %sb.id, host = got.host, guest = got.guest, "port published");
            return Ok(got);
        }
        let vm = self.live_vm(&sb).await?;
        let added = async {
            let qmp = vm.qmp().await?;
            let got = self.forward(&qmp, new).await?;
            Ok::<_, Error>((qmp, got))
        };
        let (qmp, got) = self.note_unresponsive(&sb, added.await)?;
        let mut all = sb.ports.clone();
        all.push(got);
        if let Err(e) = self.db().set_ports(&sb.id, &all) {
            // Not recorded: not published either.
            let _ = kiln_vmm::hostfwd::remove(&qmp, got.host).await;
            return Err(e);
        }
        tracing::info!(sandbox = %sb.id, host = got.host, guest = got.guest, "port published");
        Ok(got)
    }

    /// Stops forwarding a guest port; returns the sandbox.
    pub async fn unpublish_port(&self, id_or_name: &str, guest: u16) -> Result<Sandbox> {
        let Locked { sb, _guard, .. } = self.lock_sandbox(id_or_name).await?;
        let Some(p) = sb.ports.iter().find(|p| p.guest == guest).copied() else {
            return Err(Error::new(
                ErrorCode::PortNotFound,
                format!(
                    "guest port {guest} is not published in sandbox {}; `kiln port list {}` shows what is",
                    sb.name, sb.name
                ),
            ));
        };
        if let Some(br) = self.bridge() {
            br.proxies.unpublish(&sb.id, guest);
        } else if sb.state.has_vm() {
            let vm = self.live_vm(&sb).await?;
            let removed = async {
                let qmp = vm.qmp().await?;
                kiln_vmm::hostfwd::remove(&qmp, p.host).await?;
                Ok::<_, Error>(())
            };
            self.note_unresponsive(&sb, removed.await)?;
        }
        let rest: Vec<PortMapping> = sb
            .ports
            .iter()
            .filter(|q| q.guest != guest)
            .copied()
            .collect();
        self.db().set_ports(&sb.id, &rest)?;
        tracing::info!(sandbox = %sb.id, host = p.host, guest, "port unpublished");
        self.get(&sb.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked() {
        let auto = |g| PortRequest {
            guest: g,
            host: None,
        };
        let fixed = |h, g| PortRequest {
            guest: g,
            host: Some(h),
        };
        let ok = requested(&[], &[auto(80), fixed(8080, 81)]).unwrap();
        assert_eq!(
            ok[0],
            PortMapping {
                host: 0,
                guest: 80,
                auto: true
            }
        );
        assert_eq!(
            ok[1],
            PortMapping {
                host: 8080,
                guest: 81,
                auto: false
            }
        );
        assert_eq!(
            requested(&ok, &[auto(80)]).unwrap_err().code,
            ErrorCode::PortInUse
        );
        assert_eq!(
            requested(&ok, &[fixed(8080, 82)]).unwrap_err().code,
            ErrorCode::PortInUse
        );
        for bad in [
            vec![auto(0)],
            vec![fixed(0, 80)],
            vec![fixed(9, 1), fixed(9, 2)],
        ] {
            assert_eq!(
                requested(&[], &bad).unwrap_err().code,
                ErrorCode::InvalidRequest
            );
        }
        let many: Vec<PortRequest> = (1..=MAX_PORTS as u16 + 1).map(auto).collect();
        assert!(requested(&[], &many).is_err());
    }
}
