//! Exec against the real agent binary.

mod common;

use std::time::{Duration, Instant};

use common::{direct_agent, TIMEOUT};
use kiln_agent_client::{AgentError, Bytes, ErrorCode, ExecEvent, ExecRequest, PROTOCOL_VERSION};

#[tokio::test]
async fn hello_and_ping() {
    let (agent, client, hello) = direct_agent().await;
    assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
    assert_eq!(hello.pid, agent.child.id());
    assert_eq!(hello.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(hello.boot_id.len(), 36);
    assert!(client.is_connected());
    let rtt = client.ping().await.unwrap();
    assert!(rtt < TIMEOUT);
}

#[tokio::test]
async fn exit_codes_and_output() {
    let (_agent, client, _) = direct_agent().await;
    let out = client
        .exec_collect(ExecRequest::argv(["true"]))
        .await
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        (out.status.code, out.status.signal, out.status.timed_out),
        (Some(0), None, false)
    );

    let out = client
        .exec_collect(ExecRequest::argv(["false"]))
        .await
        .unwrap();
    assert_eq!(out.status.code, Some(1));

    let out = client
        .exec_collect(ExecRequest::shell("echo out; echo err >&2; exit 42"))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.status.code, Some(42));
    assert!(!out.status.success());
}

#[tokio::test]
async fn killed_by_signal() {
    let (_agent, client, _) = direct_agent().await;
    let out = client
        .exec_collect(ExecRequest::shell("kill -TERM $$"))
        .await
        .unwrap();
    assert_eq!((out.status.code, out.status.signal), (None, Some(15)));
}

#[tokio::test]
async fn env_cwd_and_defaults() {
    let (_agent, client, _) = direct_agent().await;
    let req = ExecRequest::shell(r#"echo "$FOO|$HOME|$PATH"; pwd"#)
        .env("FOO", "bar baz")
        .cwd("/tmp");
    let out = client.exec_collect(req).await.unwrap();
    assert_eq!(
        out.stdout_lossy(),
        "bar baz|/root|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n/tmp\n"
    );
    // The default working directory is /, and the agent's own environment does not leak in.
    let out = client
        .exec_collect(ExecRequest::argv(["sh", "-c", "pwd; env"]))
        .await
        .unwrap();
    let text = out.stdout_lossy();
    assert!(text.starts_with("/\n"), "{text}");
    assert!(text.lines().any(|l| l == "HOME=/root"), "{text}");
    assert!(!text.contains("CARGO"), "{text}");
    // PATH from the request is used for the program lookup.
    let dir = tempfile::tempdir().unwrap();
    let tool = dir.path().join("kiln-test-tool");
    std::fs::write(&tool, "#!/bin/sh\necho found me\n").unwrap();
    std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!("{}:/usr/bin:/bin", dir.path().display());
    let req = ExecRequest::argv(["kiln-test-tool"]).env("PATH", path);
    assert_eq!(
        client.exec_collect(req).await.unwrap().stdout,
        b"found me\n"
    );
}

#[tokio::test]
async fn spawn_errors() {
    let (_agent, client, _) = direct_agent().await;
    let code = |r: Result<kiln_agent_client::ExecHandle, AgentError>| match r {
        Err(AgentError::Guest { code, message }) => {
            assert!(!message.is_empty());
            code
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("exec unexpectedly started"),
    };
    let err = client.exec(ExecRequest::argv(["/no/such/program"])).await;
    assert_eq!(code(err), ErrorCode::ExecFailed);
    let err = client
        .exec(ExecRequest::argv(["true"]).cwd("/no/such/dir"))
        .await;
    assert_eq!(code(err), ErrorCode::NotFound);
    let both = ExecRequest {
        shell: Some("true".into()),
        ..ExecRequest::argv(["true"])
    };
    assert_eq!(code(client.exec(both).await), ErrorCode::InvalidArgument);
    assert_eq!(
        code(client.exec(ExecRequest::default()).await),
        ErrorCode::InvalidArgument
    );
    let err = client.exec(ExecRequest::argv(Vec::<String>::new())).await;
    assert_eq!(code(err), ErrorCode::InvalidArgument);
    let err = client
        .exec(ExecRequest::argv(["true"]).env("A=B", "c"))
        .await;
    assert_eq!(code(err), ErrorCode::InvalidArgument);
    // An absurd timeout means no timeout rather than a crash.
    let req = ExecRequest {
        timeout_ms: Some(u64::MAX),
        ..ExecRequest::argv(["true"])
    };
    assert!(client.exec_collect(req).await.unwrap().status.success());
    // The agent is fine afterwards.
    client.ping().await.unwrap();
}

#[tokio::test]
async fn timeout_kills_the_process_group() {
    let (_agent, client, _) = direct_agent().await;
    let started = Instant::now();
    // The background sleep holds stdout open: only killing the group ends this quickly.
    let req = ExecRequest::shell("sleep 30 & sleep 30").timeout(Duration::from_millis(300));
    let out = client.exec_collect(req).await.unwrap();
    assert!(out.status.timed_out);
    assert_eq!(out.status.signal, Some(9));
    assert!(out.status.duration_ms >= 300);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn cancel_kills_the_process() {
    let (_agent, client, _) = direct_agent().await;
    let mut h = client
        .exec(ExecRequest::argv(["sleep", "30"]))
        .await
        .unwrap();
    assert!(matches!(h.next_event().await, Some(ExecEvent::Started { pid }) if pid > 1));
    let started = Instant::now();
    h.cancel().await.unwrap();
    let out = h.collect().await.unwrap();
    assert_eq!(out.status.signal, Some(9));
    assert!(!out.status.timed_out);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn output_streams_before_exit() {
    let (_agent, client, _) = direct_agent().await;
    let mut h = client
        .exec(ExecRequest::shell("echo first; sleep 3; echo second"))
        .await
        .unwrap();
    let started = Instant::now();
    assert!(matches!(
        h.next_event().await,
        Some(ExecEvent::Started { .. })
    ));
    assert_eq!(
        h.next_event().await,
        Some(ExecEvent::Stdout(Bytes::from_static(b"first\n")))
    );
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "first line came late"
    );
    assert_eq!(
        h.next_event().await,
        Some(ExecEvent::Stdout(Bytes::from_static(b"second\n")))
    );
    assert!(matches!(h.next_event().await, Some(ExecEvent::Exit(s)) if s.success()));
    assert_eq!(h.next_event().await, None);
    assert!(h.error().is_none());
}

#[tokio::test]
async fn background_child_does_not_hold_exit() {
    let (_agent, client, _) = direct_agent().await;
    let started = Instant::now();
    let out = client
        .exec_collect(ExecRequest::shell("echo bye; sleep 30 &"))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"bye\n");
    assert_eq!(out.status.code, Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn stdin_round_trip() {
    let (_agent, client, _) = direct_agent().await;
    let h = client
        .exec(ExecRequest::argv(["cat"]).with_stdin())
        .await
        .unwrap();
    h.write_stdin(Bytes::from_static(b"hello ")).await.unwrap();
    h.write_stdin(Bytes::from_static(b"world")).await.unwrap();
    h.close_stdin().await.unwrap();
    let out = h.collect().await.unwrap();
    assert_eq!(out.stdout, b"hello world");

    // Larger than one frame, and more than a pipe buffer while the child is still reading.
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let h = client
        .exec(ExecRequest::argv(["wc", "-c"]).with_stdin())
        .await
        .unwrap();
    h.write_stdin(Bytes::from(data)).await.unwrap();
    h.close_stdin().await.unwrap();
    assert_eq!(h.collect().await.unwrap().stdout_lossy().trim(), "3000000");

    // Without stdin the child reads /dev/null.
    let out = client
        .exec_collect(ExecRequest::argv(["cat"]))
        .await
        .unwrap();
    assert_eq!((out.stdout.len(), out.status.code), (0, Some(0)));
}

/// A child that does not read yet makes `write_stdin` wait, instead of the agent buffering
/// everything in guest memory.
#[tokio::test]
async fn stdin_is_flow_controlled() {
    let (_agent, client, _) = direct_agent().await;
    let h = client
        .exec(ExecRequest::shell("sleep 1; wc -c").with_stdin())
        .await
        .unwrap();
    let h = std::sync::Arc::new(h);
    let writer = {
        let h = std::sync::Arc::clone(&h);
        tokio::spawn(async move { h.write_stdin(Bytes::from(vec![b'x'; 32 << 20])).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !writer.is_finished(),
        "32 MiB were accepted before the child read anything"
    );
    tokio::time::timeout(TIMEOUT, writer)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    h.close_stdin().await.unwrap();
    let Ok(h) = std::sync::Arc::try_unwrap(h) else {
        panic!("handle still shared")
    };
    assert_eq!(
        h.collect().await.unwrap().stdout_lossy().trim(),
        (32 << 20).to_string()
    );
}

#[tokio::test]
async fn ten_concurrent_execs() {
    let (_agent, client, _) = direct_agent().await;
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..10 {
        let client = client.clone();
        set.spawn(async move {
            let req = ExecRequest::shell(format!("sleep 0.5; echo {i}; echo e{i} >&2; exit {i}"));
            (i, client.exec_collect(req).await.unwrap())
        });
    }
    while let Some(res) = set.join_next().await {
        let (i, out) = res.unwrap();
        assert_eq!(out.stdout_lossy(), format!("{i}\n"));
        assert_eq!(out.stderr_lossy(), format!("e{i}\n"));
        assert_eq!(out.status.code, Some(i));
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "not concurrent: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn large_output_is_capped_and_drained() {
    let (_agent, client, _) = direct_agent().await;
    let out = client
        .exec_collect(ExecRequest::shell(
            "head -c 20000000 /dev/zero; echo done >&2",
        ))
        .await
        .unwrap();
    // Collected output keeps the first COLLECT_LIMIT bytes and says it dropped the rest; the rest is still
    // read (stderr, written after all of stdout, arrives whole) so the process is not blocked.
    assert_eq!(out.stdout.len(), kiln_agent_client::COLLECT_LIMIT);
    assert!(out.truncated);
    assert!(out.stdout.iter().all(|&b| b == 0));
    assert_eq!(out.stderr, b"done\n");
    assert_eq!(out.status.code, Some(0));
}

#[tokio::test]
async fn disconnect_fails_pending_requests() {
    let (mut agent, client, _) = direct_agent().await;
    let h = client
        .exec(ExecRequest::argv(["sleep", "30"]))
        .await
        .unwrap();
    agent.child.kill().unwrap();
    let err = tokio::time::timeout(TIMEOUT, h.collect())
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, AgentError::Disconnected), "{err}");
    assert!(!client.is_connected());
    assert!(matches!(client.ping().await, Err(AgentError::Disconnected)));
}

/// Round-trip times over the unix socket; printed for the record (`--nocapture`).
#[tokio::test]
async fn latency() {
    let (_agent, client, _) = direct_agent().await;
    for _ in 0..50 {
        client.ping().await.unwrap();
    }
    let n = 500;
    let started = Instant::now();
    for _ in 0..n {
        client.ping().await.unwrap();
    }
    let ping = started.elapsed() / n;
    let n = 100;
    let started = Instant::now();
    for _ in 0..n {
        assert!(client
            .exec_collect(ExecRequest::argv(["true"]))
            .await
            .unwrap()
            .status
            .success());
    }
    let exec = started.elapsed() / n;
    println!("ping round trip: {ping:?}, exec `true` round trip: {exec:?}");
}
