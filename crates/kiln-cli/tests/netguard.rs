//! What a guest may reach over its network (run as root): not the cloud metadata address, not link-local
//! or private networks, DNS only to the host's resolvers; `--allow-net` opens chosen ranges.
//!
//! Everything happens inside two network namespaces this test creates and removes: the daemon runs in
//! `D`, whose only routes lead over a veth pair to `S`, where test servers listen on the metadata
//! addresses, on private and ULA addresses and on documentation addresses (198.51.100.1, 2001:db8:2::1).
//! The addresses live in `S`, so they are not the daemon's own (LOCAL) addresses, as on a real host. No
//! packet leaves the two namespaces, and the daemon's iptables rules are `D`'s alone.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{require_image, Daemon};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The two namespaces; removed on drop (also when the test panics).
struct Namespaces {
    daemon: String,
    servers: String,
}

impl Namespaces {
    fn create() -> Namespaces {
        let pid = std::process::id();
        let ns = Namespaces {
            daemon: format!("kiln-ngd-{pid}"),
            servers: format!("kiln-ngs-{pid}"),
        };
        // `ns` exists before the first namespace does, so a failure below still removes what was made.
        let (d, s) = (ns.daemon.as_str(), ns.servers.as_str());
        ip(&["netns", "add", d]);
        ip(&["netns", "add", s]);
        ip(&[
            "-n", d, "link", "add", "vd", "type", "veth", "peer", "name", "vs", "netns", s,
        ]);
        for (n, dev, addr) in [(d, "vd", "192.0.2.2/24"), (s, "vs", "192.0.2.1/24")] {
            ip(&["-n", n, "addr", "add", addr, "dev", dev]);
            ip(&["-n", n, "link", "set", dev, "up"]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        // Everything the daemon's namespace sends goes to the servers' namespace, nowhere else.
        ip(&["-n", d, "route", "add", "default", "via", "192.0.2.1"]);
        for addr in TARGETS {
            ip(&["-n", s, "addr", "add", &format!("{addr}/32"), "dev", "lo"]);
        }
        // IPv6 the same way (`nodad`: usable at once).
        ip(&[
            "-n",
            d,
            "addr",
            "add",
            "2001:db8:1::2/64",
            "dev",
            "vd",
            "nodad",
        ]);
        ip(&[
            "-n",
            s,
            "addr",
            "add",
            "2001:db8:1::1/64",
            "dev",
            "vs",
            "nodad",
        ]);
        ip(&[
            "-n",
            d,
            "-6",
            "route",
            "add",
            "default",
            "via",
            "2001:db8:1::1",
        ]);
        for addr in TARGETS6 {
            ip(&["-n", s, "addr", "add", &format!("{addr}/128"), "dev", "lo"]);
        }
        ns
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in [&self.daemon, &self.servers] {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

const METADATA: &str = "169.254.169.254";
const PRIVATE: &str = "10.99.0.1";
/// The resolver the daemon's namespace is given (a private address, as a LAN router often is).
const RESOLVER: &str = "10.99.0.53";
const TESTNET: &str = "198.51.100.1";
const TARGETS: [&str; 4] = [METADATA, PRIVATE, RESOLVER, TESTNET];
const METADATA6: &str = "fd00:ec2::254";
const ULA6: &str = "fd99::1";
const TESTNET6: &str = "2001:db8:2::1";
const TARGETS6: [&str; 3] = [METADATA6, ULA6, TESTNET6];

/// The DNS answer each server gives for any A query: tells in the guest which server answered.
fn dns_answer(server: &str) -> &'static str {
    match server {
        RESOLVER => "192.0.2.53",
        PRIVATE => "192.0.2.101",
        _ => "192.0.2.151",
    }
}

/// TCP servers on :80 and :53 and DNS servers on udp :53, in the servers' namespace; each connection or
/// datagram is recorded as `tcp ADDR:PORT` / `udp ADDR:PORT`.
struct Servers {
    hits: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Servers {
    fn start(netns: &str) -> Servers {
        let hits = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = format!("/var/run/netns/{netns}");
        let thread = std::thread::spawn({
            let (hits, stop) = (hits.clone(), stop.clone());
            move || {
                // Only this thread enters the namespace; its sockets stay there.
                let f = std::fs::File::open(&path).expect("open netns");
                // SAFETY: setns on this thread with a valid namespace descriptor.
                let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                let mut tcp = Vec::new();
                let mut udp = Vec::new();
                for (addr, port) in [
                    (METADATA, 80),
                    (PRIVATE, 80),
                    (PRIVATE, 53),
                    (TESTNET, 80),
                    (TESTNET, 53),
                    (METADATA6, 80),
                    (ULA6, 80),
                    (TESTNET6, 80),
                ] {
                    let l = TcpListener::bind((addr, port)).expect("bind tcp");
                    l.set_nonblocking(true).unwrap();
                    tcp.push((format!("{addr}:{port}"), l));
                }
                for addr in [PRIVATE, RESOLVER, TESTNET] {
                    let u = UdpSocket::bind((addr, 53)).expect("bind udp");
                    u.set_nonblocking(true).unwrap();
                    udp.push((addr, u));
                }
                ready_tx.send(()).unwrap();
                let record = |h: String| hits.lock().unwrap().push(h);
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    for (name, l) in &tcp {
                        if let Ok((mut s, _)) = l.accept() {
                            record(format!("tcp {name}"));
                            let _ = s.set_nonblocking(false);
                            let _ = s.write_all(format!("hello from {name}\n").as_bytes());
                            // Let the guest's request arrive before closing, so it sees no reset.
                            let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
                            let _ = s.read(&mut buf);
                        }
                    }
                    for (addr, u) in &udp {
                        if let Ok((n, from)) = u.recv_from(&mut buf) {
                            record(format!("udp {addr}:53"));
                            if let Some(reply) = dns_reply(&buf[..n], dns_answer(addr)) {
                                let _ = u.send_to(&reply, from);
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("servers did not start");
        Servers {
            hits,
            stop,
            thread: Some(thread),
        }
    }

    fn hits(&self) -> Vec<String> {
        self.hits.lock().unwrap().clone()
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An answer to a DNS query: one A record `addr` for an A question, no records for anything else.
fn dns_reply(query: &[u8], addr: &str) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let mut end = 12;
    while *query.get(end)? != 0 {
        end += 1 + *query.get(end)? as usize;
    }
    let qtype = u16::from_be_bytes([*query.get(end + 1)?, *query.get(end + 2)?]);
    end += 5;
    let question = query.get(12..end)?;
    let is_a = qtype == 1;
    let mut r = Vec::new();
    r.extend_from_slice(&query[..2]);
    r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, u8::from(is_a), 0, 0, 0, 0]);
    r.extend_from_slice(question);
    if is_a {
        let ip: std::net::Ipv4Addr = addr.parse().ok()?;
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        r.extend_from_slice(&ip.octets());
    }
    Some(r)
}

/// A daemon in namespace `ns` whose /etc/resolv.conf names `RESOLVER` (a private mount namespace binds a
/// file over it, as `ip netns exec` does with /etc/netns; `ip netns exec` itself also remounts /sys, which
/// would hide the cgroup hierarchy).
fn daemon_in(ns: &str, resolv: &std::path::Path, env: &[(&str, &str)]) -> Daemon {
    let netns = format!("--net=/var/run/netns/{ns}");
    let resolv = resolv.to_str().expect("utf-8 path");
    Daemon::start_prefixed(
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            "r=$0; n=$1; shift; mount --bind \"$r\" /etc/resolv.conf && exec nsenter \"$n\" -- \"$@\"",
            resolv,
            &netns,
        ],
        &[],
        env,
    )
}

/// Runs a shell script in the guest; returns its combined output.
fn guest(d: &Daemon, sb: &str, script: &str) -> String {
    let out = d.kiln(&["exec", sb, "--", "sh", "-c", script]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Whether a TCP connection from the guest reached the server at `addr:port` (its greeting came back).
fn tcp_reaches(d: &Daemon, sb: &str, addr: &str, port: u16) -> (bool, String) {
    let text = guest(
        d,
        sb,
        &format!("echo x | timeout 8 nc -w 3 {addr} {port}; echo rc=$?"),
    );
    (text.contains(&format!("hello from {addr}:{port}")), text)
}

/// Whether a DNS query over UDP to `server` (default: the guest's resolver, 10.0.2.3) got `answer`.
fn dns_answers(d: &Daemon, sb: &str, server: &str, answer: &str) -> (bool, String) {
    let text = guest(
        d,
        sb,
        &format!("timeout 6 nslookup -type=a kiln.test {server}; echo rc=$?"),
    );
    (text.contains(answer), text)
}

#[test]
fn guests_reach_neither_metadata_nor_private_networks_and_dns_only_via_the_resolver() {
    require_image("tiny");
    if !is_root() {
        eprintln!("skipping: network namespaces and the firewall need root");
        return;
    }
    let started = Instant::now();
    let ns = Namespaces::create();
    let servers = Servers::start(&ns.servers);
    let dir = tempfile::Builder::new()
        .prefix("ktng")
        .tempdir_in("/tmp")
        .unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, format!("nameserver {RESOLVER}\n")).unwrap();
    let mut d = daemon_in(&ns.daemon, &resolv, &[]);
    assert!(
        d.log().contains("per-sandbox unprivileged uids")
            && d.log().contains("guests are kept off"),
        "the daemon does not confine VMs or has no firewall:\n{}",
        d.log()
    );
    // The IPv6 chain is there too (ULA, link-local and the IPv6 metadata address).
    let v6 = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", ns.daemon))
        .args(["ip6tables", "-w", "-S", "KILN-VM-OUT"])
        .output()
        .expect("run ip6tables");
    let v6 = String::from_utf8_lossy(&v6.stdout);
    for range in ["fd00:ec2::254/128", "fe80::/10", "fc00::/7"] {
        assert!(v6.contains(range), "no IPv6 rule for {range}:\n{v6}");
    }
    d.create(&["--name", "g"]);

    // The guest does have a network: a public-looking address answers, and DNS through slirp's relay
    // (10.0.2.3) reaches the host's resolver although that resolver is on a private address.
    let (ok, text) = tcp_reaches(&d, "g", TESTNET, 80);
    assert!(ok, "the guest has no network at all: {text}");
    let (ok, text) = dns_answers(&d, "g", "10.0.2.3", dns_answer(RESOLVER));
    assert!(ok, "DNS through the host's resolver failed: {text}");
    // IPv6 too, once the guest has its address from slirp's router advertisements.
    guest(
        &d,
        "g",
        "for i in $(seq 40); do ip -6 addr show dev eth0 | grep -q 'scope site\\|scope global' && break; sleep 0.25; done",
    );
    let (ok, text) = tcp_reaches(&d, "g", TESTNET6, 80);
    assert!(ok, "the guest has no IPv6 network: {text}");

    // Denied: metadata, a private network (tcp and udp, port 80 and 53), port 53 of anything but the
    // resolver.
    let mut reached = Vec::new();
    for (addr, port) in [
        (METADATA, 80),
        (PRIVATE, 80),
        (PRIVATE, 53),
        (TESTNET, 53),
        (METADATA6, 80),
        (ULA6, 80),
    ] {
        let (ok, text) = tcp_reaches(&d, "g", addr, port);
        if ok {
            reached.push(format!("tcp {addr}:{port}: {text}"));
        }
    }
    for server in [PRIVATE, TESTNET] {
        let (ok, text) = dns_answers(&d, "g", server, dns_answer(server));
        if ok {
            reached.push(format!("udp {server}:53: {text}"));
        }
    }
    assert!(
        reached.is_empty(),
        "the guest reached:\n{}",
        reached.join("\n")
    );
    let mut hits = servers.hits();
    hits.sort();
    hits.dedup();
    assert_eq!(
        hits,
        vec![
            format!("tcp {TESTNET}:80"),
            format!("tcp {TESTNET6}:80"),
            format!("udp {RESOLVER}:53")
        ],
        "servers saw other traffic than the allowed"
    );

    // With an allowlist (KILN_ALLOW_NET, as `--allow-net`), the private range opens; metadata stays shut.
    // The VM outlives the daemon; the new daemon replaces the rules.
    d.restart_with_env(&[("KILN_ALLOW_NET", "10.99.0.0/24")]);
    let (ok, text) = tcp_reaches(&d, "g", PRIVATE, 80);
    assert!(
        ok,
        "--allow-net 10.99.0.0/24 did not open {PRIVATE}: {text}"
    );
    let (ok, text) = tcp_reaches(&d, "g", METADATA, 80);
    assert!(!ok, "the allowlist opened the metadata address: {text}");
    assert!(
        !servers.hits().contains(&format!("tcp {METADATA}:80")),
        "{:?}",
        servers.hits()
    );
    eprintln!("netguard test took {:?}", started.elapsed());
}
