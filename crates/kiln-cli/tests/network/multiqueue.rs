//! Multiqueue NICs: a multi-vCPU guest on bridged networking gets a queue pair per vCPU; the count is
//! part of its saved state, so its snapshots resume on TAPs with as many queues, and a user-mode daemon
//! (one queue) refuses them with `snapshot_incompatible`.

use super::*;

/// The guest's eth0 queues, e.g. "rx-0 rx-1 tx-0 tx-1".
fn queues(d: &Daemon, sb: &str) -> String {
    guest(d, sb, "ls /sys/class/net/eth0/queues | sort | tr '\\n' ' '")
        .trim()
        .to_string()
}

#[test]
fn a_two_vcpu_bridged_guest_has_two_queues_and_its_snapshot_resumes_only_where_they_can_be_given() {
    require_image("tiny");
    if !is_root() {
        eprintln!("skipping: network namespaces, TAP devices and the firewall need root");
        return;
    }
    let ns = Namespaces::create("q");
    let _server = Server::start(&ns.servers, SERVER, 80);
    let dir = tempfile::Builder::new()
        .prefix("ktnq")
        .tempdir_in("/tmp")
        .unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 192.0.2.1\n").unwrap();
    // The mode in the environment, so a restart can change it.
    let mut d = daemon_in(&ns.daemon, &resolv, &[], &[("KILN_NETWORK", "bridged")]);

    // A cold-booted 2-vCPU guest: two queue pairs, and the network works over them.
    d.create(&["--name", "mq", "--cpus", "2", "--boot"]);
    assert_eq!(queues(&d, "mq"), "rx-0 rx-1 tx-0 tx-1");
    let (ok, text) = tcp_reaches(&d, "mq", SERVER, 80);
    assert!(ok, "the multiqueue guest has no egress:\n{text}");

    // Its snapshot resumes with a NIC of two queues, on a new address that answers.
    d.kiln_ok(&["snapshot", "create", "mq", "--name", "mqs"]);
    d.kiln_ok(&["snapshot", "resume", "mqs", "--name", "mqc"]);
    assert_eq!(queues(&d, "mqc"), "rx-0 rx-1 tx-0 tx-1");
    let addr = address(&d, "mqc");
    assert_ne!(addr, address(&d, "mq"));
    serve_name(&d, "mqc");
    let page = fetch_in(&ns.daemon, addr.clone(), 8000);
    assert!(page.ends_with("mqc\n"), "mqc at {addr} answered: {page}");
    let (ok, text) = tcp_reaches(&d, "mqc", SERVER, 80);
    assert!(ok, "the resumed copy has no egress:\n{text}");
    // Its own machine after a stop and start, and a fork child, keep the two queues too.
    d.kiln_ok(&["stop", "mq"]);
    d.kiln_ok(&["start", "mq"]);
    assert_eq!(queues(&d, "mq"), "rx-0 rx-1 tx-0 tx-1");
    let forked: Value = serde_json::from_str(
        &d.kiln_ok(&["--json", "fork", "mq", "--count", "1", "--name", "kid"]),
    )
    .unwrap();
    let kid = forked["sandboxes"][0]["name"].as_str().unwrap().to_string();
    assert_eq!(queues(&d, &kid), "rx-0 rx-1 tx-0 tx-1");
    for sb in ["mq", "mqc"] {
        let (ok, text) = tcp_reaches(&d, sb, SERVER, 80);
        assert!(ok, "{sb} has no egress:\n{text}");
    }
    let (ok, text) = tcp_reaches(&d, &kid, SERVER, 80);
    assert!(ok, "the fork child has no egress:\n{text}");
    for sb in ["mq", "mqc", kid.as_str()] {
        d.kiln_ok(&["sandbox", "delete", "-y", sb]);
    }

    // User networking has one queue: the snapshot is refused before any VM starts, and nothing is left.
    d.restart_with_env(&[("KILN_NETWORK", "user")]);
    let out = d.kiln(&["snapshot", "resume", "mqs", "--name", "u"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("[snapshot_incompatible]")
            && err.contains("2 queue pairs")
            && err.contains("--network bridged"),
        "{err}"
    );
    assert!(!d.kiln(&["sandbox", "get", "u"]).status.success());
    d.terminate(Duration::from_secs(10));
}

/// Entries of the daemon's `sandboxes/` directory.
fn sandbox_dirs(d: &Daemon) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d.data_dir().join("sandboxes"))
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_multiqueue_memory_snapshot_is_refused_with_422_on_user_networking_and_leaves_nothing() {
    require_image("tiny");
    if !is_root() {
        eprintln!("skipping: network namespaces, TAP devices and the firewall need root");
        return;
    }
    let ns = Namespaces::create("r");
    let dir = tempfile::Builder::new()
        .prefix("ktnr")
        .tempdir_in("/tmp")
        .unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 192.0.2.1\n").unwrap();
    let env = [
        ("KILN_NETWORK", "bridged"),
        ("KILN_TEMPLATE_SNAPSHOTS", "off"),
    ];
    let mut d = daemon_in(&ns.daemon, &resolv, &[], &env);
    d.create(&["--name", "mq", "--cpus", "2", "--boot"]);
    assert_eq!(queues(&d, "mq"), "rx-0 rx-1 tx-0 tx-1");
    let snap: Value =
        serde_json::from_str(&d.kiln_ok(&["--json", "snapshot", "create", "mq", "--name", "mqs"]))
            .unwrap();
    let id = snap["id"].as_str().expect("snapshot id").to_string();
    d.kiln_ok(&["sandbox", "delete", "-y", "mq"]);

    // The same data directory on user networking (one queue): refused before any VM starts.
    d.restart_with_env(&[("KILN_NETWORK", "user"), ("KILN_TEMPLATE_SNAPSHOTS", "off")]);
    let before = sandbox_dirs(&d);
    let (status, v) = d.api(
        "POST",
        &format!("/v1/snapshots/{id}/resume"),
        Some(serde_json::json!({"name": "u"})),
    );
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["error"]["code"], "snapshot_incompatible", "{v}");
    let (status, _) = d.api("GET", "/v1/sandboxes/u", None);
    assert_eq!(status, 404, "a refused resume left a sandbox row");
    assert_eq!(sandbox_dirs(&d), before, "a refused resume left files");
    assert!(d.qemu_pids().is_empty(), "a refused resume left QEMU");
    // Refused by the snapshot's manifest, before a sandbox exists (not by the machine's start).
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&format!("snapshot {id} cannot run on this daemon"))
            && msg.contains("2 queue pairs")
            && msg.contains("--network bridged"),
        "{msg}"
    );
    d.terminate(Duration::from_secs(10));
}

#[test]
fn template_snapshot_creates_get_a_queue_pair_per_vcpu_on_a_bridged_daemon() {
    require_image("tiny");
    if !is_root() {
        eprintln!("skipping: network namespaces, TAP devices and the firewall need root");
        return;
    }
    let ns = Namespaces::create("t");
    let _server = Server::start(&ns.servers, SERVER, 80);
    let dir = tempfile::Builder::new()
        .prefix("ktnt")
        .tempdir_in("/tmp")
        .unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 192.0.2.1\n").unwrap();
    // Lazy: no start-up template snapshot, so the first create makes the one of its own shape.
    let env = [
        ("KILN_NETWORK", "bridged"),
        ("KILN_TEMPLATE_SNAPSHOTS", "lazy"),
    ];
    let mut d = daemon_in(&ns.daemon, &resolv, &["--max-vcpus", "2"], &env);

    // A default create (a template snapshot's copy) with 2 vCPUs: its builder had two queue pairs.
    let two = d.create(&["--name", "two", "--cpus", "2"]);
    assert_eq!(two["boot"]["mode"], "resume", "{two}");
    assert_eq!(queues(&d, "two"), "rx-0 rx-1 tx-0 tx-1");
    let (ok, text) = tcp_reaches(&d, "two", SERVER, 80);
    assert!(ok, "the 2-vCPU copy has no egress:\n{text}");

    // A 1-vCPU copy of the same snapshot (a vCPU offlined on resume) keeps the NIC and its egress.
    let one = d.create(&["--name", "one", "--cpus", "1"]);
    assert_eq!(one["boot"]["mode"], "resume", "{one}");
    assert_eq!(one["boot"]["snapshot"], two["boot"]["snapshot"], "{one}");
    eprintln!(
        "1-vCPU copy of a 2-queue snapshot shows: {}",
        queues(&d, "one")
    );
    let (ok, text) = tcp_reaches(&d, "one", SERVER, 80);
    assert!(ok, "the 1-vCPU copy has no egress:\n{text}");
    for sb in ["two", "one"] {
        d.kiln_ok(&["sandbox", "delete", "-y", sb]);
    }
    d.terminate(Duration::from_secs(10));
}

#[test]
fn a_one_vcpu_template_copy_of_a_bridged_daemon_moves_to_user_networking() {
    require_image("tiny");
    if !is_root() {
        eprintln!("skipping: network namespaces, TAP devices and the firewall need root");
        return;
    }
    let ns = Namespaces::create("o");
    let dir = tempfile::Builder::new()
        .prefix("ktno")
        .tempdir_in("/tmp")
        .unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 192.0.2.1\n").unwrap();
    let env = [
        ("KILN_NETWORK", "bridged"),
        ("KILN_TEMPLATE_SNAPSHOTS", "lazy"),
    ];
    let mut d = daemon_in(&ns.daemon, &resolv, &["--max-vcpus", "2"], &env);

    // A 1-vCPU default create: its machine has a spare vCPU, but its NIC has one queue (the guest's
    // driver would use one channel even with the spare onlined), so its memory snapshots stay portable.
    let one = d.create(&["--name", "one", "--cpus", "1"]);
    assert_eq!(one["boot"]["mode"], "resume", "{one}");
    assert_eq!(queues(&d, "one"), "rx-0 tx-0");
    d.kiln_ok(&["snapshot", "create", "one", "--name", "ones"]);
    d.kiln_ok(&["sandbox", "delete", "-y", "one"]);
    d.restart_with_env(&[
        ("KILN_NETWORK", "user"),
        ("KILN_TEMPLATE_SNAPSHOTS", "lazy"),
    ]);
    d.kiln_ok(&["snapshot", "resume", "ones", "--name", "back"]);
    assert_eq!(queues(&d, "back"), "rx-0 tx-0");
    d.kiln_ok(&["sandbox", "delete", "-y", "back"]);
    d.terminate(Duration::from_secs(10));
}
