//! Hosts coming and going, garbage on the wire, and stale streams.

mod common;

use std::time::{Duration, Instant};

use common::{chardev_agent, direct_agent_raw, TIMEOUT};
use kiln_agent_client::proto::{
    encode_frame, encode_json, Frame, FrameDecoder, FrameKind, HelloInfo, Request, Response,
};
use kiln_agent_client::{AgentClient, Bytes, ExecEvent, ExecRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Reads frames until one arrives on `stream`.
async fn frame_on(sock: &mut UnixStream, decoder: &mut FrameDecoder, stream: u32) -> Frame {
    let mut buf = vec![0u8; 65536];
    loop {
        while let Some(f) = decoder.next_frame() {
            if f.stream == stream {
                return f;
            }
        }
        let n = tokio::time::timeout(TIMEOUT, sock.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "agent closed the connection");
        decoder.push(&buf[..n]);
    }
}

#[tokio::test]
async fn garbage_on_the_wire_then_valid_requests() {
    let (_agent, mut sock) = direct_agent_raw(&[]).await;
    let mut decoder = FrameDecoder::new();
    let mut wire = b"\x00\xffKLN1garbage KLN".to_vec();
    let mut corrupted = encode_json(FrameKind::Request, 5, &Request::Ping).unwrap();
    let last = corrupted.len() - 1;
    corrupted[last] ^= 1;
    wire.extend(corrupted);
    wire.extend(encode_json(FrameKind::Request, 1, &Request::Hello).unwrap());
    sock.write_all(&wire).await.unwrap();
    let hello = frame_on(&mut sock, &mut decoder, 1).await;
    assert!(matches!(
        hello.json::<Response>().unwrap(),
        Response::Hello(HelloInfo { .. })
    ));

    // Frames for streams that do not exist, and an undecodable request, are survived.
    let mut wire = encode_frame(FrameKind::Stdin, 999, b"stray").unwrap();
    wire.extend(encode_frame(FrameKind::Cancel, 998, b"").unwrap());
    wire.extend(encode_frame(FrameKind::Data, 997, b"stray").unwrap());
    wire.extend(encode_frame(FrameKind::Request, 7, b"{not json").unwrap());
    wire.extend(b"more garbage");
    wire.extend(encode_json(FrameKind::Request, 2, &Request::Ping).unwrap());
    sock.write_all(&wire).await.unwrap();
    let bad = frame_on(&mut sock, &mut decoder, 7).await;
    assert!(matches!(
        bad.json::<Response>().unwrap(),
        Response::Error { .. }
    ));
    let pong = frame_on(&mut sock, &mut decoder, 2).await;
    assert_eq!(pong.json::<Response>().unwrap(), Response::Pong);
}

/// The client side: garbage and frames for streams it does not know are skipped.
#[tokio::test]
async fn client_skips_garbage_and_unknown_streams() {
    let (host, mut fake_agent) = UnixStream::pair().unwrap();
    let agent = tokio::spawn(async move {
        let mut decoder = FrameDecoder::new();
        let hello = loop {
            let f = frame_on(&mut fake_agent, &mut decoder, 1).await;
            if f.kind == FrameKind::Request {
                break f;
            }
        };
        assert_eq!(hello.json::<Request>().unwrap(), Request::Hello);
        let info = HelloInfo {
            agent_version: "test".into(),
            protocol_version: kiln_agent_client::PROTOCOL_VERSION,
            boot_id: "b".into(),
            hostname: "h".into(),
            uptime_ms: 1,
            pid: 1,
            features: Vec::new(),
        };
        let mut wire = b"junk\x00KLN1".to_vec();
        wire.extend(encode_frame(FrameKind::Stdout, 4242, b"from an old session").unwrap());
        wire.extend(encode_json(FrameKind::Response, 4243, &Response::Pong).unwrap());
        wire.extend(encode_json(FrameKind::Response, 1, &Response::Hello(info)).unwrap());
        fake_agent.write_all(&wire).await.unwrap();
        fake_agent
    });
    let (client, hello) = AgentClient::from_stream(host, TIMEOUT).await.unwrap();
    assert_eq!(hello.agent_version, "test");
    assert!(client.is_connected());
    drop(agent.await.unwrap());
    // The fake agent hung up: the client notices.
    tokio::time::timeout(TIMEOUT, async {
        while client.is_connected() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
}

/// Like a VM restored into a new QEMU: the first host goes away mid-exec and another connects
/// to the same still-running agent.
#[tokio::test]
async fn new_host_takes_over_mid_exec() {
    let chardev = chardev_agent().await;
    let marker = chardev.agent.dir.path().join("stdin-closed");
    let (first, _) = AgentClient::connect(&chardev.host_socket, TIMEOUT)
        .await
        .unwrap();
    let mut running = first
        .exec(ExecRequest::shell("echo start; sleep 1; echo end"))
        .await
        .unwrap();
    assert!(matches!(
        running.next_event().await,
        Some(ExecEvent::Started { .. })
    ));
    assert_eq!(
        running.next_event().await,
        Some(ExecEvent::Stdout(Bytes::from_static(b"start\n")))
    );
    let waiting = first
        .exec(ExecRequest::shell(format!("cat; echo closed > {}", marker.display())).with_stdin())
        .await
        .unwrap();
    waiting
        .write_stdin(Bytes::from_static(b"partial input"))
        .await
        .unwrap();
    // The host goes away without cancelling them (as when a VM is restored into a new QEMU).
    running.detach();
    waiting.detach();
    drop(first);

    let (second, _) = AgentClient::connect(&chardev.host_socket, TIMEOUT)
        .await
        .unwrap();
    second.ping().await.unwrap();
    let out = second
        .exec_collect(ExecRequest::argv(["echo", "still here"]))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"still here\n");
    // The new session detached the old exec waiting for stdin: it got EOF and finished.
    let started = Instant::now();
    while !marker.exists() {
        assert!(
            started.elapsed() < TIMEOUT,
            "the detached exec never saw EOF on stdin"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The old exec's remaining output ("end") is dropped, not delivered to the new host.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    second.ping().await.unwrap();
}

/// The old host died halfway through a large frame and the transport never reported a hang-up:
/// the agent must not let that frame's length swallow the new host's Hello.
#[tokio::test]
async fn new_host_after_a_torn_frame() {
    let chardev = chardev_agent().await;
    let mut old = UnixStream::connect(&chardev.host_socket).await.unwrap();
    let big = encode_frame(FrameKind::Request, 3, &vec![b' '; 600_000]).unwrap();
    old.write_all(b"some garbage").await.unwrap();
    old.write_all(&big[..5000]).await.unwrap();
    drop(old);
    let started = Instant::now();
    let (client, _) = AgentClient::connect(&chardev.host_socket, TIMEOUT)
        .await
        .unwrap();
    println!("hello after a torn frame took {:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    client.ping().await.unwrap();
}
