//! Port forwards on a running QEMU's user-mode network (`-netdev user,id=net0`), added and removed
//! through QMP's `human-monitor-command` (QEMU 10 has no QMP command of its own for them).
//!
//! A forward asked for with host port 0 is bound by slirp to a port the kernel picks, atomically: no
//! other process can take it between choosing and binding. The port it got is read back from
//! `info usernet`.

use crate::{Qmp, VmmError};

/// The netdev every kiln VM has (qemu.rs).
const NETDEV: &str = "net0";

async fn hmp(qmp: &Qmp, line: &str) -> Result<String, VmmError> {
    let v = qmp
        .execute(
            "human-monitor-command",
            Some(serde_json::json!({ "command-line": line })),
        )
        .await?;
    Ok(v.as_str().unwrap_or_default().to_string())
}

/// The host ports of this VM's TCP forwards to `guest` on 127.0.0.1, from `info usernet`'s text:
/// `TCP[HOST_FORWARD]  FD  SRC_ADDR SRC_PORT  DST_ADDR DST_PORT  RECVQ SENDQ`.
pub fn parse_usernet(text: &str, guest: u16) -> Vec<u16> {
    text.lines()
        .filter_map(|line| {
            let t: Vec<&str> = line.split_whitespace().collect();
            if t.len() < 6 || t[0] != "TCP[HOST_FORWARD]" || t[2] != "127.0.0.1" {
                return None;
            }
            let host: u16 = t[3].parse().ok()?;
            let dst: u16 = t[5].parse().ok()?;
            (dst == guest).then_some(host)
        })
        .collect()
}

/// Forwards 127.0.0.1:`host` to the guest's `guest` port; `host` 0 lets the kernel pick. Returns the host
/// port bound, or `Ok(None)` when the host port could not be bound (in use).
pub async fn add(qmp: &Qmp, host: u16, guest: u16) -> Result<Option<u16>, VmmError> {
    let before = parse_usernet(&hmp(qmp, "info usernet").await?, guest);
    let out = hmp(
        qmp,
        &format!("hostfwd_add {NETDEV} tcp:127.0.0.1:{host}-:{guest}"),
    )
    .await?;
    if !out.trim().is_empty() {
        // "Could not set up host forwarding rule ..." (bind failed): the caller decides what next.
        return Ok(None);
    }
    if host != 0 {
        return Ok(Some(host));
    }
    let after = parse_usernet(&hmp(qmp, "info usernet").await?, guest);
    after
        .into_iter()
        .find(|p| !before.contains(p))
        .map(Some)
        .ok_or_else(|| {
            VmmError::QmpProtocol(
                "QEMU added a port forward but `info usernet` does not list it".into(),
            )
        })
}

/// Removes the forward from 127.0.0.1:`host`; false if QEMU had none.
pub async fn remove(qmp: &Qmp, host: u16) -> Result<bool, VmmError> {
    let out = hmp(
        qmp,
        &format!("hostfwd_remove {NETDEV} tcp:127.0.0.1:{host}"),
    )
    .await?;
    Ok(out.contains("removed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernet_listing_parses() {
        let text = "Hub -1 (net0):\r\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n  TCP[HOST_FORWARD]  11       127.0.0.1 45678       10.0.2.15    80     0     0\r\n  TCP[HOST_FORWARD]   3       127.0.0.1 44063       10.0.2.15    80     0     0\r\n  TCP[HOST_FORWARD]   4       127.0.0.1 40000       10.0.2.15  8080     0     0\r\n  TCP[ESTABLISHED]   5       10.0.2.15 1234       1.2.3.4    80     0     0\r\n";
        assert_eq!(parse_usernet(text, 80), vec![45678, 44063]);
        assert_eq!(parse_usernet(text, 8080), vec![40000]);
        assert!(parse_usernet(text, 22).is_empty());
    }
}
