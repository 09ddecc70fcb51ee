//! IPv6 for bridged guests, between the test's two namespaces (2001:db8:1::/64 between them,
//! 2001:db8:2::1 the server).

use super::*;

const SERVER6: &str = "2001:db8:2::1";

/// IPv6 between the two namespaces: `D` 2001:db8:1::2 routed to `S`, which holds SERVER6.
fn add_ipv6(ns: &Namespaces) {
    let (d, s) = (ns.daemon.as_str(), ns.servers.as_str());
    ip(&[
        "-n",
        d,
        "-6",
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
        "-6",
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
    ip(&[
        "-n",
        s,
        "-6",
        "addr",
        "add",
        &format!("{SERVER6}/128"),
        "dev",
        "lo",
    ]);
}

/// The guest's global IPv6 address, checked against the one its IPv4 address gives.
fn address6(d: &Daemon, sb: &str) -> String {
    let v4 = address(d, sb);
    let host: u32 = v4.rsplit('.').next().unwrap().parse().unwrap();
    let want = format!("fd6b:696c:6e00::{host:x}");
    let has = guest(d, sb, "ip -6 -o addr show dev eth0 scope global");
    assert!(
        has.contains(&format!("{want}/128")),
        "{sb} ({v4}) should have {want}/128: {has}"
    );
    // `sandbox get` shows it, in JSON and as text.
    assert_eq!(get(d, sb)["address6"], want.as_str(), "{}", get(d, sb));
    let shown = d.kiln_ok(&["sandbox", "get", sb]);
    assert!(
        shown.contains(&want),
        "`sandbox get` does not show {want}:\n{shown}"
    );
    want
}

#[test]
fn bridged_guests_have_ipv6_of_their_own() {
    require_image("tiny");
    if !is_root() {
        eprintln!("skipping: network namespaces, TAP devices and the firewall need root");
        return;
    }
    let ns = Namespaces::create("6");
    add_ipv6(&ns);
    let server = Server::start(&ns.servers, SERVER6, 80);
    let dir = tempfile::Builder::new()
        .prefix("ktn6")
        .tempdir_in("/tmp")
        .unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 192.0.2.1\n").unwrap();
    let mut d = daemon_in(&ns.daemon, &resolv, &["--network", "bridged"], &[]);
    d.create(&["--name", "a", "--network", "team"]);
    d.create(&["--name", "b", "--network", "team"]);
    d.create(&["--name", "c", "--no-egress"]);
    let (a6, b6, c6) = (address6(&d, "a"), address6(&d, "b"), address6(&d, "c"));
    assert!(a6 != b6 && b6 != c6, "{a6} {b6} {c6}");

    let ping6 = |sb: &str, to: &str| {
        guest(
            &d,
            sb,
            &format!("ping6 -c 1 -W 3 {to} >/dev/null 2>&1; echo rc=$?"),
        )
        .contains("rc=0")
    };
    assert!(ping6("a", &b6), "a cannot ping6 b (same network)");
    assert!(ping6("b", &a6), "b cannot ping6 a (same network)");
    assert!(!ping6("a", &c6), "a pings6 c (not in its network)");

    // Egress over IPv6 (masqueraded), refused with egress off.
    let nc6 = |sb: &str| {
        guest(
            &d,
            sb,
            &format!("echo x | timeout 8 nc -w 3 {SERVER6} 80; echo rc=$?"),
        )
    };
    let text = nc6("a");
    assert!(
        text.contains(&format!("hello from {SERVER6}:80")),
        "a has no IPv6 egress:\n{text}"
    );
    let before = server.hits();
    let text = nc6("c");
    assert!(
        !text.contains("hello") && server.hits() == before,
        "c reached {SERVER6} with egress off:\n{text}"
    );

    // A resumed copy: a new IPv6 address with its new IPv4 one, and IPv6 egress from it.
    d.kiln_ok(&["snapshot", "create", "a", "--name", "s6"]);
    d.kiln_ok(&["snapshot", "resume", "s6", "--name", "copy"]);
    let copy6 = address6(&d, "copy");
    assert!(![&a6, &b6, &c6].contains(&&copy6), "{copy6}");
    let has = guest(&d, "copy", "ip -6 -o addr show dev eth0 scope global");
    assert!(
        !has.contains(&format!("{a6}/")),
        "the copy kept a's address: {has}"
    );
    assert!(
        nc6("copy").contains("hello from"),
        "the copy has no IPv6 egress"
    );
    // A fork child: in its source's network, on an IPv6 address of its own.
    let forked: Value =
        serde_json::from_str(&d.kiln_ok(&["--json", "fork", "a", "--count", "1", "--name", "kid"]))
            .unwrap();
    let kid = forked["sandboxes"][0]["name"].as_str().unwrap().to_string();
    let kid6 = address6(&d, &kid);
    assert!(![&a6, &b6, &c6, &copy6].contains(&&kid6), "{kid6}");
    assert!(
        ping6("b", &kid6),
        "b cannot ping6 the fork child (same network)"
    );

    for sb in ["a", "b", "c", "copy", kid.as_str()] {
        d.kiln_ok(&["sandbox", "delete", "-y", sb]);
    }
    let rules = ns.in_daemon_ns(&["ip6tables-save"]);
    let left: Vec<&str> = rules
        .lines()
        .filter(|l| l.contains("fd6b:696c:6e00::") && l.contains("/128"))
        .collect();
    assert!(left.is_empty(), "rules naming addresses are left: {left:?}");
    d.terminate(Duration::from_secs(10));
}
