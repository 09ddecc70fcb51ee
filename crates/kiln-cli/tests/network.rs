//! Bridged networking (`kiln serve --network bridged`, run as root): each sandbox its own address, a new
//! one for every resumed copy and fork child, named networks whose members reach each other, NAT out,
//! egress off, the host's API port out of reach, and nothing left behind.
//!
//! Everything happens inside two network namespaces this test creates and removes: the daemon runs in
//! `D` (its TAPs, routes and iptables rules are `D`'s alone), whose only route leads over a veth pair to
//! `S`, where a TCP server listens on 198.51.100.1:80. No packet leaves the two namespaces.

mod common;
#[path = "network/default_mode.rs"]
mod default_mode;
#[path = "network/ipv6.rs"]
mod ipv6;
#[path = "network/multiqueue.rs"]
mod multiqueue;
#[path = "network/readdress.rs"]
mod readdress;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{require_image, Daemon};
use serde_json::Value;

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

const SERVER: &str = "198.51.100.1";

/// The two namespaces; removed on drop (also when the test panics).
struct Namespaces {
    daemon: String,
    servers: String,
}

impl Namespaces {
    fn create(tag: &str) -> Namespaces {
        let pid = std::process::id();
        let ns = Namespaces {
            daemon: format!("kiln-n{tag}d-{pid}"),
            servers: format!("kiln-n{tag}s-{pid}"),
        };
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
        ip(&["-n", d, "route", "add", "default", "via", "192.0.2.1"]);
        ip(&["-n", s, "addr", "add", &format!("{SERVER}/32"), "dev", "lo"]);
        ns
    }

    fn in_daemon_ns(&self, cmd: &[&str]) -> String {
        let out = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.daemon))
            .args(cmd)
            .output()
            .expect("nsenter");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in [&self.daemon, &self.servers] {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// Runs `f` on a thread inside namespace `ns` (its sockets live there).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        // SAFETY: setns on this thread with a valid namespace descriptor.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread")
}

/// A TCP server on `addr:port` in namespace `ns` that greets and records each connection.
struct Server {
    hits: Arc<Mutex<usize>>,
    stop: Arc<AtomicBool>,
}

impl Server {
    fn start(ns: &str, addr: &'static str, port: u16) -> Server {
        let hits = Arc::new(Mutex::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let l = in_netns(ns, move || {
            let l = TcpListener::bind((addr, port)).expect("bind");
            l.set_nonblocking(true).unwrap();
            l
        });
        let (h, s) = (hits.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Ok((mut c, _)) = l.accept() {
                    *h.lock().unwrap() += 1;
                    let _ = c.set_nonblocking(false);
                    let _ = c.write_all(format!("hello from {addr}:{port}\n").as_bytes());
                    let _ = c.set_read_timeout(Some(Duration::from_millis(300)));
                    let _ = c.read(&mut [0u8; 64]);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Server { hits, stop }
    }

    fn hits(&self) -> usize {
        *self.hits.lock().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The daemon in namespace `ns` (/etc/resolv.conf bound over as in tests/netguard.rs, so the guests'
/// resolver is an address of the namespaces).
fn daemon_in(ns: &str, resolv: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
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
        args,
        env,
    )
}

fn guest(d: &Daemon, sb: &str, script: &str) -> String {
    let out = d.kiln(&["exec", sb, "--", "sh", "-c", script]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn get(d: &Daemon, sb: &str) -> Value {
    serde_json::from_str(&d.kiln_ok(&["--json", "sandbox", "get", sb])).unwrap()
}

fn address(d: &Daemon, sb: &str) -> String {
    get(d, sb)["address"]
        .as_str()
        .unwrap_or_else(|| panic!("sandbox {sb} has no address: {}", get(d, sb)))
        .to_string()
}

/// Whether `sb` gets an answer to one ping of `addr`.
fn pings(d: &Daemon, sb: &str, addr: &str) -> bool {
    guest(
        d,
        sb,
        &format!("ping -c 1 -W 2 {addr} >/dev/null 2>&1; echo rc=$?"),
    )
    .contains("rc=0")
}

/// Whether a TCP connection from the guest got `addr:port`'s greeting.
fn tcp_reaches(d: &Daemon, sb: &str, addr: &str, port: u16) -> (bool, String) {
    let text = guest(
        d,
        sb,
        &format!("echo x | timeout 8 nc -w 3 {addr} {port}; echo rc=$?"),
    );
    (text.contains(&format!("hello from {addr}:{port}")), text)
}

/// GET / from `addr:port`, made from inside namespace `ns` (retried briefly while a server starts).
fn fetch_in(ns: &str, addr: String, port: u16) -> String {
    in_netns(ns, move || {
        let mut body = String::new();
        for _ in 0..25 {
            let target = (addr.as_str(), port);
            if let Ok(mut s) = std::net::TcpStream::connect(target) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n");
                body.clear();
                let _ = s.read_to_string(&mut body);
                if body.contains("200 OK") {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        body
    })
}

/// Starts busybox httpd on guest port 8000 serving the guest's name (from its own file system, so a
/// fork child's copy of a running httpd serves the child's name).
fn serve_name(d: &Daemon, sb: &str) {
    guest(
        d,
        sb,
        "mkdir -p /www && hostname > /www/index.html && (httpd -p 8000 -h /www &)",
    );
}

fn set_name(d: &Daemon, sb: &str) {
    guest(d, sb, "hostname > /www/index.html");
}

/// kiln's TAPs and the addresses kiln's rules name, in the daemon's namespace.
fn host_state(ns: &Namespaces) -> (Vec<String>, Vec<String>) {
    let links = ns.in_daemon_ns(&["ip", "-o", "link", "show"]);
    let taps = links
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .filter(|n| n.starts_with("kt"))
        .map(str::to_string)
        .collect();
    let rules = ns.in_daemon_ns(&["iptables-save"]);
    let named = rules
        .lines()
        .filter(|l| l.contains("10.213.0.") && l.contains("/32"))
        .map(str::to_string)
        .collect();
    (taps, named)
}

fn addresses_of(d: &Daemon, sb: &str) -> String {
    guest(d, sb, "ip -4 -o addr show dev eth0")
}

#[test]
fn bridged_sandboxes_have_their_own_addresses_networks_and_egress() {
    require_image("tiny");
    if !is_root() {
        eprintln!("skipping: network namespaces, TAP devices and the firewall need root");
        return;
    }
    let started = Instant::now();
    let ns = Namespaces::create("b");
    let server = Server::start(&ns.servers, SERVER, 80);
    let dir = tempfile::Builder::new()
        .prefix("ktnb")
        .tempdir_in("/tmp")
        .unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 192.0.2.1\n").unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
    let api_port = 17911u16;
    let listen = format!("0.0.0.0:{api_port}");
    let mut d = daemon_in(
        &ns.daemon,
        &resolv,
        &[
            "--network",
            "bridged",
            "--listen",
            &listen,
            "--token-file",
            token.to_str().unwrap(),
        ],
        &[],
    );

    // Two members of network "team", one outsider without egress, each with its own address.
    let a = d.create(&["--name", "a", "--network", "team", "-p", "8000"]);
    let b = d.create(&["--name", "b", "--network", "team"]);
    let c = d.create(&["--name", "c", "--no-egress"]);
    let (aa, ab, ac) = (address(&d, "a"), address(&d, "b"), address(&d, "c"));
    assert_eq!(a["network"], "team");
    assert!(b["address"].is_string() && c["network"].is_null());
    for addr in [&aa, &ab, &ac] {
        assert!(addr.starts_with("10.213.0."), "{addr}");
    }
    assert!(aa != ab && ab != ac && aa != ac, "{aa} {ab} {ac}");
    assert!(addresses_of(&d, "a").contains(&format!("{aa}/24")));
    let shown = d.kiln_ok(&["sandbox", "get", "a"]);
    assert!(
        shown.contains(&aa),
        "`sandbox get` does not show the address:\n{shown}"
    );

    // Members reach each other; nobody else reaches them or is reached by them.
    assert!(pings(&d, "a", &ab), "a cannot ping b (same network)");
    assert!(pings(&d, "b", &aa), "b cannot ping a (same network)");
    assert!(!pings(&d, "a", &ac), "a pings c (not in its network)");
    assert!(!pings(&d, "c", &aa), "c pings a (not in its network)");

    // Egress through NAT to a server in another namespace; refused with egress off.
    let (ok, text) = tcp_reaches(&d, "a", SERVER, 80);
    assert!(ok, "a did not reach {SERVER}:80 through NAT:\n{text}");
    let before = server.hits();
    let (ok, text) = tcp_reaches(&d, "c", SERVER, 80);
    assert!(
        !ok && server.hits() == before,
        "c reached {SERVER} with egress off:\n{text}"
    );

    // The API port, listening on every address of the daemon's host, is out of the guests' reach (on
    // the gateway and on the host's other address), while it answers on the host.
    let api = fetch_in(&ns.daemon, "127.0.0.1".into(), api_port);
    assert!(!api.is_empty(), "the API does not answer on the host");
    for host in ["10.213.0.1", "192.0.2.2"] {
        let text = guest(
            &d,
            "a",
            &format!("echo x | timeout 5 nc -w 2 {host} {api_port}; echo rc=$?"),
        );
        assert!(
            !text.contains("HTTP"),
            "a guest reached the API on {host}:\n{text}"
        );
    }

    // The published port is relayed to the guest's address.
    serve_name(&d, "a");
    let host_port = get(&d, "a")["ports"][0]["host"].as_u64().unwrap() as u16;
    let page = fetch_in(&ns.daemon, "127.0.0.1".into(), host_port);
    assert!(
        page.contains("\na\n") || page.ends_with("a\n"),
        "published port: {page}"
    );

    // Fork children and a resumed copy: addresses of their own, each answering on its own.
    let forked: Value =
        serde_json::from_str(&d.kiln_ok(&["--json", "fork", "a", "--count", "2", "--name", "kid"]))
            .unwrap();
    assert_eq!(forked["sandboxes"].as_array().unwrap().len(), 2);
    d.kiln_ok(&["snapshot", "create", "a", "--name", "snap"]);
    d.kiln_ok(&["snapshot", "resume", "snap", "--name", "copy"]);
    let mut seen = vec![aa.clone(), ab.clone(), ac.clone()];
    for sb in ["kid-1", "kid-2", "copy"] {
        let addr = address(&d, sb);
        assert!(
            !seen.contains(&addr),
            "{sb} got an address already in use: {addr}"
        );
        seen.push(addr.clone());
        let own = addresses_of(&d, sb);
        assert!(
            own.contains(&format!("{addr}/24")) && !own.contains(&format!("{aa}/")),
            "{sb} ({addr}) has: {own}"
        );
        set_name(&d, sb);
        let page = fetch_in(&ns.daemon, addr.clone(), 8000);
        assert!(
            page.ends_with(&format!("{sb}\n")),
            "{sb} at {addr} answered: {page}"
        );
    }
    // The source answers on its own address still, and fork children stay in its network.
    assert!(fetch_in(&ns.daemon, aa.clone(), 8000).ends_with("a\n"));
    assert_eq!(get(&d, "kid-1")["network"], "team");
    assert!(
        pings(&d, "kid-1", &ab),
        "a fork child cannot reach its network"
    );

    // Hibernation keeps the address.
    d.kiln_ok(&["stop", "b"]);
    d.kiln_ok(&["start", "b"]);
    assert_eq!(address(&d, "b"), ab);
    assert!(
        pings(&d, "a", &ab),
        "b is unreachable after a stop and start"
    );

    // A daemon SIGKILLed and restarted puts back what its sandboxes need, and nothing more.
    let before = host_state(&ns);
    d.restart_hard();
    assert!(
        pings(&d, "a", &ab),
        "a cannot reach b after the daemon restarted"
    );
    assert!(
        !pings(&d, "c", &aa),
        "c reaches a after the daemon restarted"
    );
    let page = fetch_in(&ns.daemon, "127.0.0.1".into(), host_port);
    assert!(
        page.ends_with("a\n"),
        "published port after a restart: {page}"
    );
    assert_eq!(host_state(&ns), before);

    // Deleting everything leaves no TAP and no rule naming an address.
    for sb in ["a", "b", "c", "kid-1", "kid-2", "copy"] {
        d.kiln_ok(&["sandbox", "delete", "-y", sb]);
    }
    let (taps, rules) = host_state(&ns);
    assert!(
        taps.is_empty() && rules.is_empty(),
        "left: {taps:?} {rules:?}"
    );
    let doctor = d.kiln_ok(&["--json", "doctor"]);
    assert!(!doctor.contains("network_leftover"), "{doctor}");
    d.terminate(Duration::from_secs(10));
    eprintln!("bridged networking checked in {:?}", started.elapsed());
}

#[test]
fn snapshots_move_between_user_and_bridged_networking() {
    require_image("tiny");
    if !is_root() {
        eprintln!("skipping: network namespaces, TAP devices and the firewall need root");
        return;
    }
    let ns = Namespaces::create("m");
    let _server = Server::start(&ns.servers, SERVER, 80);
    let dir = tempfile::Builder::new()
        .prefix("ktnm")
        .tempdir_in("/tmp")
        .unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 192.0.2.1\n").unwrap();
    let mut d = daemon_in(&ns.daemon, &resolv, &[], &[("KILN_NETWORK", "user")]);
    d.create(&["--name", "u"]);
    assert!(get(&d, "u")["address"].is_null());
    d.kiln_ok(&["snapshot", "create", "u", "--name", "from-user"]);

    // The same data directory on bridged networking: a copy of the user-mode guest gets an address.
    d.restart_with_env(&[("KILN_NETWORK", "bridged")]);
    d.kiln_ok(&["snapshot", "resume", "from-user", "--name", "br"]);
    let addr = address(&d, "br");
    assert!(addresses_of(&d, "br").contains(&format!("{addr}/24")));
    assert!(!addresses_of(&d, "br").contains("10.0.2.15"));
    let (ok, text) = tcp_reaches(&d, "br", SERVER, 80);
    assert!(ok, "the re-addressed copy has no egress:\n{text}");
    d.kiln_ok(&["snapshot", "create", "br", "--name", "from-bridged"]);

    // And back: a copy of the bridged guest on user networking is 10.0.2.15 again.
    d.kiln_ok(&["sandbox", "delete", "-y", "br"]);
    d.restart_with_env(&[("KILN_NETWORK", "user")]);
    d.kiln_ok(&["snapshot", "resume", "from-bridged", "--name", "back"]);
    assert!(get(&d, "back")["address"].is_null());
    assert!(addresses_of(&d, "back").contains("10.0.2.15/24"));
    let (ok, text) = tcp_reaches(&d, "back", SERVER, 80);
    assert!(
        ok,
        "the copy back on user networking has no egress:\n{text}"
    );
    for sb in ["u", "back"] {
        d.kiln_ok(&["sandbox", "delete", "-y", sb]);
    }
    // No TAP was left, and the daemon on user networking removed the bridged rules.
    let (taps, _) = host_state(&ns);
    assert!(taps.is_empty(), "{taps:?}");
    assert!(!ns.in_daemon_ns(&["iptables-save"]).contains("KILN-NET"));
    d.terminate(Duration::from_secs(10));
}
