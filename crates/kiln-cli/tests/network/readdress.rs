//! A copy's connections of its old address are reset; warm spares on a bridged daemon.

use super::*;

/// A TCP server on `addr:port` in namespace `ns` that greets each connection and then holds it open
/// (reading until the peer goes), so a client's connection stays established and idle.
fn holding_server(ns: &str, addr: &'static str, port: u16) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let l = in_netns(ns, move || {
        let l = TcpListener::bind((addr, port)).expect("bind");
        l.set_nonblocking(true).unwrap();
        l
    });
    let s = stop.clone();
    std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            if let Ok((mut c, _)) = l.accept() {
                let _ = c.set_nonblocking(false);
                let _ = c.write_all(format!("hello from {addr}:{port}\n").as_bytes());
                std::thread::spawn(move || {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(120)));
                    let _ = c.read(&mut [0u8; 64]);
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    stop
}

/// Waits up to `limit` for `file` in `sb` to contain `needle`; returns its last contents and whether.
fn wait_guest_file(
    d: &Daemon,
    sb: &str,
    file: &str,
    needle: &str,
    limit: Duration,
) -> (bool, String) {
    let until = Instant::now() + limit;
    loop {
        let text = guest(d, sb, &format!("cat {file} 2>&1"));
        if text.contains(needle) {
            return (true, text);
        }
        if Instant::now() > until {
            return (false, text);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_resumed_copy_resets_the_connections_of_its_old_address() {
    require_image("tiny");
    if !is_root() {
        eprintln!("skipping: network namespaces, TAP devices and the firewall need root");
        return;
    }
    let ns = Namespaces::create("r");
    let _stop = holding_server(&ns.servers, SERVER, 81);
    let dir = tempfile::Builder::new()
        .prefix("ktnr")
        .tempdir_in("/tmp")
        .unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 192.0.2.1\n").unwrap();
    let mut d = daemon_in(&ns.daemon, &resolv, &["--network", "bridged"], &[]);
    d.create(&["--name", "a"]);
    // A client holding an idle connection (its stdin a FIFO nobody writes, so it never sends).
    d.kiln_ok(&[
        "process",
        "start",
        "a",
        "--",
        "sh",
        "-c",
        &format!(
            "rm -f /tmp/f; mkfifo /tmp/f; \
             (nc {SERVER} 81 </tmp/f >/tmp/nc.out 2>&1; echo \"ended rc=$?\" >>/tmp/nc.out) & \
             exec 3>/tmp/f; wait"
        ),
    ]);
    let (up, text) = wait_guest_file(
        &d,
        "a",
        "/tmp/nc.out",
        "hello from",
        Duration::from_secs(20),
    );
    assert!(up, "the client in a did not connect:\n{text}");
    d.kiln_ok(&["snapshot", "create", "a", "--name", "held"]);
    d.kiln_ok(&["snapshot", "resume", "held", "--name", "copy"]);
    assert_ne!(address(&d, "copy"), address(&d, "a"));

    // The copy's connection belonged to a's address: it ends at once instead of hanging.
    let started = Instant::now();
    let (ended, text) =
        wait_guest_file(&d, "copy", "/tmp/nc.out", "ended", Duration::from_secs(20));
    assert!(
        ended,
        "the copy's connection of its old address was left hanging:\n{text}"
    );
    eprintln!(
        "the copy's connection ended {:?} after the resume returned",
        started.elapsed()
    );
    // The source keeps its own.
    let text = guest(&d, "a", "cat /tmp/nc.out");
    assert!(!text.contains("ended"), "a lost its connection:\n{text}");
    for sb in ["a", "copy"] {
        d.kiln_ok(&["sandbox", "delete", "-y", sb]);
    }
    d.terminate(Duration::from_secs(10));
}

#[test]
fn a_bridged_daemon_keeps_warm_spares_that_get_their_own_address() {
    require_image("tiny");
    if !is_root() {
        eprintln!("skipping: network namespaces, TAP devices and the firewall need root");
        return;
    }
    let ns = Namespaces::create("w");
    let _server = Server::start(&ns.servers, SERVER, 80);
    let dir = tempfile::Builder::new()
        .prefix("ktnw")
        .tempdir_in("/tmp")
        .unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 192.0.2.1\n").unwrap();
    let mut d = daemon_in(
        &ns.daemon,
        &resolv,
        &["--network", "bridged", "--warm-spares", "1"],
        &[],
    );
    d.create(&["--name", "w0", "--network", "team"]);
    assert!(
        d.wait_log("warm spare ready", 1, Duration::from_secs(120)),
        "a bridged daemon made no warm spare:\n{}",
        common::tail(&d.log(), 20)
    );
    // The next create takes the spare, which joins the network asked for, on an address of its own.
    let w1 = d.create(&["--name", "w1", "--network", "team"]);
    assert_eq!(
        d.log().matches("sandbox resumed from a warm spare").count(),
        1,
        "the create did not take the spare"
    );
    assert_eq!(w1["network"], "team");
    let (a0, a1) = (address(&d, "w0"), address(&d, "w1"));
    assert!(a1.starts_with("10.213.0.") && a1 != a0, "{a0} {a1}");
    assert!(addresses_of(&d, "w1").contains(&format!("{a1}/24")));
    let (ok, text) = tcp_reaches(&d, "w1", SERVER, 80);
    assert!(ok, "the sandbox from a spare has no egress:\n{text}");
    assert!(pings(&d, "w1", &a0), "w1 cannot reach w0 in its network");
    for sb in ["w0", "w1"] {
        d.kiln_ok(&["sandbox", "delete", "-y", sb]);
    }
    d.terminate(Duration::from_secs(10));
}
