//! Named snapshots (issue 12, `saveNamed` in the TypeScript seed page): a snapshot given a further name is
//! found under it by every route and the CLI, outlives its source sandbox, shares one namespace with ids,
//! goes with its snapshot, and survives a daemon restart.

mod common;

use common::{require_image, Daemon};
use serde_json::{json, Value};

fn json_of(d: &Daemon, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&d.kiln_ok(&a)).expect("JSON output")
}

fn name(d: &Daemon, snap: &str, name: &str) -> (u16, Value) {
    d.api(
        "POST",
        &format!("/v1/snapshots/{snap}/names"),
        Some(json!({ "name": name })),
    )
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[test]
fn a_named_snapshot_is_found_by_its_name_everywhere_and_outlives_its_sandbox() {
    require_image("tiny");
    let mut d = Daemon::start();
    d.create(&["--name", "src"]);
    d.kiln_ok(&[
        "exec",
        "src",
        "--",
        "sh",
        "-c",
        "echo at-snapshot > /root/marker",
    ]);
    json_of(&d, &["snapshot", "create", "src", "--name", "s1"]);
    json_of(&d, &["snapshot", "create", "src", "--name", "s2"]);

    // The CLI names it; get, list and the API find it by the name, with its id unchanged.
    let named = json_of(&d, &["snapshot", "name", "s1", "golden"]);
    assert_eq!(
        (named["id"].as_str(), &named["names"]),
        (Some("s1"), &json!(["golden"]))
    );
    let got = json_of(&d, &["snapshot", "get", "golden"]);
    assert_eq!(
        (got["id"].as_str(), &got["names"]),
        (Some("s1"), &json!(["golden"]))
    );
    let list = json_of(&d, &["snapshot", "list"]);
    let s1 = list
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "s1")
        .expect("s1 listed");
    assert_eq!(s1["names"], json!(["golden"]));
    assert!(
        d.kiln_ok(&["snapshot", "list"]).contains("golden"),
        "the table shows names"
    );

    // Idempotent for a name it has (or its own id).
    assert_eq!(name(&d, "s1", "golden").0, 200);
    assert_eq!(name(&d, "golden", "s1").0, 200);
    // One namespace: another snapshot's name or id is refused, and so is a capture under a taken name.
    let (status, v) = name(&d, "s2", "golden");
    assert_eq!((status, code(&v)), (409, "snapshot_already_exists"), "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("golden"),
        "{v}"
    );
    let (status, v) = name(&d, "s1", "s2");
    assert_eq!((status, code(&v)), (409, "snapshot_already_exists"), "{v}");
    let (status, v) = d.api(
        "POST",
        "/v1/sandboxes/src/snapshots",
        Some(json!({"name": "golden"})),
    );
    assert_eq!((status, code(&v)), (409, "snapshot_already_exists"), "{v}");
    // The ID rules apply to names; unknown snapshots are 404.
    let (status, v) = name(&d, "s1", "Bad Name");
    assert_eq!((status, code(&v)), (400, "invalid_request"), "{v}");
    let (status, v) = name(&d, "nope", "other");
    assert_eq!((status, code(&v)), (404, "snapshot_not_found"), "{v}");

    // It outlives the source sandbox: resume and roll back by name.
    d.kiln_ok(&["sandbox", "delete", "-y", "src"]);
    let copy = json_of(&d, &["snapshot", "resume", "golden", "--name", "copy"]);
    assert_eq!(copy["origin"], "snapshot:s1");
    let marker = d.kiln_ok(&["exec", "copy", "--", "cat", "/root/marker"]);
    assert_eq!(marker.trim(), "at-snapshot");
    let back = json_of(&d, &["snapshot", "restore", "golden", "--resume"]);
    assert_eq!(
        (back["name"].as_str(), back["restored_from"].as_str()),
        (Some("src"), Some("s1"))
    );

    // The name survives a daemon restart.
    d.restart_hard();
    assert_eq!(json_of(&d, &["snapshot", "get", "golden"])["id"], "s1");

    // Deleting by name deletes the snapshot; the name goes with it and is free again.
    let deleted = json_of(&d, &["snapshot", "delete", "-y", "golden"]);
    assert_eq!(deleted["id"], "s1");
    for gone in ["golden", "s1"] {
        let (status, v) = d.api("GET", &format!("/v1/snapshots/{gone}"), None);
        assert_eq!(
            (status, code(&v)),
            (404, "snapshot_not_found"),
            "{gone}: {v}"
        );
    }
    assert_eq!(name(&d, "s2", "golden").0, 200);
    assert_eq!(json_of(&d, &["snapshot", "get", "golden"])["id"], "s2");
    d.kiln_ok(&["sandbox", "delete", "-y", "copy", "src"]);
}
