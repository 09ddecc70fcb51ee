//! The default network mode (`kiln serve` without `--network`): bridged for a root daemon that can build
//! it, user networking with the reason otherwise. Inside the test's namespaces, as the other tests here.

use super::*;

fn info(d: &Daemon) -> Value {
    serde_json::from_str(&d.kiln_ok(&["--json", "info"])).unwrap()
}

#[test]
fn a_root_daemon_is_bridged_by_default_and_falls_back_to_user_networking_saying_why() {
    require_image("tiny");
    if !is_root() {
        eprintln!("skipping: network namespaces, TAP devices and the firewall need root");
        return;
    }
    let ns = Namespaces::create("a");
    let dir = tempfile::Builder::new()
        .prefix("ktna")
        .tempdir_in("/tmp")
        .unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 192.0.2.1\n").unwrap();

    // No --network and no KILN_NETWORK (the harness's "user" taken away): bridged.
    let mut d = daemon_in(&ns.daemon, &resolv, &[], &[("KILN_NETWORK", "")]);
    let i = info(&d);
    assert_eq!(i["network"], "bridged", "{i}");
    assert!(
        i["network_reason"].as_str().unwrap().contains("default"),
        "{i}"
    );
    d.create(&["--name", "own"]);
    let addr = address(&d, "own");
    assert!(addr.starts_with("10.213.0."), "{addr}");
    assert!(
        addresses_of(&d, "own").contains(&format!("{addr}/24")),
        "the guest does not have its own address {addr}"
    );
    assert!(!ns
        .in_daemon_ns(&["ip", "-o", "link", "show", "kiln0"])
        .is_empty());
    d.kiln_ok(&["sandbox", "delete", "-y", "own"]);
    d.terminate(Duration::from_secs(10));

    // A bridge name taken by another kind of device (the namespace's veth): the preflight fails, the
    // daemon runs on user networking, logs one line saying why, and `kiln info` says so too.
    let d = daemon_in(
        &ns.daemon,
        &resolv,
        &["--bridge", "vd"],
        &[("KILN_NETWORK", "")],
    );
    let i = info(&d);
    assert_eq!(i["network"], "user", "{i}");
    let why = i["network_reason"].as_str().unwrap();
    assert!(why.contains("vd exists and is not a bridge"), "{i}");
    let log = d.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("user networking") && l.contains("vd exists"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    let shown = d.kiln_ok(&["info"]);
    assert!(shown.contains("network:     user"), "{shown}");
    let u = d.create(&["--name", "u"]);
    assert!(u["address"].is_null(), "{u}");
    assert!(addresses_of(&d, "u").contains("10.0.2.15/24"));
    // Nothing was put on the veth, and no bridged rule is installed.
    let vd = ns.in_daemon_ns(&["ip", "-o", "addr", "show", "dev", "vd"]);
    assert!(!vd.contains("10.213.0.1"), "{vd}");
    assert!(!ns.in_daemon_ns(&["iptables-save"]).contains("KILN-NET"));
    d.kiln_ok(&["sandbox", "delete", "-y", "u"]);
    drop(d);

    // Asked for explicitly, bridged networking refuses such a bridge instead of falling back.
    let out = Command::new("timeout")
        .args(["60", "nsenter"])
        .arg(format!("--net=/var/run/netns/{}", ns.daemon))
        .arg(common::KILN)
        .arg("--data-dir")
        .arg(dir.path().join("explicit"))
        .args(["serve", "--network", "bridged", "--bridge", "vd"])
        .env("KILN_WARM_SPARES", "0")
        .env("KILN_TEMPLATE_SNAPSHOTS", "off")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("vd exists and is not a bridge"),
        "{err}"
    );
}
