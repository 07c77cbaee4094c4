//! Bad clients are turned away with the right goodbye and a clear log line, while a healthy
//! session on the same server keeps receiving pushes throughout.

use std::time::Duration;

use bytes::BytesMut;
use e2e::{ClientError, DeviceClient, STEP_TIMEOUT, ServerProcess, read_raw_frame, within};
use push_proto::{
    device::{GoodbyeReason, server_frame},
    sender::RevokeDeviceRequest,
};
use push_server::auth::{DeviceAuthority, unix_secs};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const HEALTHY: &str = "healthy-phone";

/// The healthy device still gets a message sent now.
async fn healthy_still_works(server: &ServerProcess, healthy: &mut DeviceClient, step: &str) {
    let id = format!("after-{step}");
    server.send_text(HEALTHY, &id, step).await;
    let p = within(&format!("healthy push after {step}"), healthy.next_push())
        .await
        .unwrap_or_else(|e| panic!("healthy session broken after {step}: {e}"));
    assert_eq!(p.id, id, "healthy session after {step}");
    within("healthy ack", healthy.ack(&[p.seq])).await.unwrap();
}

/// Connecting with `credential` must end in a goodbye with `expected`.
async fn expect_rejected(server: &ServerProcess, credential: &str, expected: GoodbyeReason) -> String {
    match server.connect(credential, 0).await {
        Err(ClientError::Goodbye { reason, detail }) => {
            assert_eq!(reason, expected, "goodbye detail: {detail}");
            detail
        }
        Err(e) => panic!("expected Goodbye {expected:?}, got error {e}"),
        Ok(c) => panic!(
            "expected Goodbye {expected:?}, but the server accepted the session {:?}",
            c.server_hello
        ),
    }
}

/// Open raw TLS, write `bytes`, and expect Goodbye PROTOCOL_ERROR followed by the end of the
/// stream. Returns the goodbye's detail.
async fn expect_protocol_error(server: &ServerProcess, bytes: &[u8]) -> String {
    let opts = server.device_options("unused", 0);
    let mut tls = within("raw TLS open", DeviceClient::open(&opts))
        .await
        .expect("TLS handshake");
    within("raw write", async {
        tls.write_all(bytes).await?;
        tls.flush().await
    })
    .await
    .expect("write raw bytes");
    let mut buf = BytesMut::new();
    let detail = match within("goodbye", read_raw_frame(&mut tls, &mut buf)).await {
        Ok(Some(f)) => match f.kind {
            Some(server_frame::Kind::Goodbye(g)) => {
                assert_eq!(
                    g.reason(),
                    GoodbyeReason::ProtocolError,
                    "goodbye detail: {}",
                    g.detail
                );
                g.detail
            }
            other => panic!("expected Goodbye PROTOCOL_ERROR, got {other:?}"),
        },
        other => panic!("expected Goodbye PROTOCOL_ERROR, got {other:?}"),
    };
    // Then the server closes the connection.
    match within("close after goodbye", read_raw_frame(&mut tls, &mut buf)).await {
        Ok(None) | Err(ClientError::Io(_)) => {}
        other => panic!("expected the server to close after the goodbye, got {other:?}"),
    }
    detail
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_are_rejected_while_a_healthy_session_carries_on() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("push.toml");
    std::fs::write(&config, "[limits]\ntls_handshake_timeout_ms = 300\n").unwrap();
    let data = tmp.path().join("data");
    let server = ServerProcess::start(&data, &["--config", config.to_str().unwrap()]);

    let healthy_cred = server.issue(HEALTHY).await;
    let mut healthy = server
        .connect(&healthy_cred, 0)
        .await
        .expect("healthy device connects");
    healthy_still_works(&server, &mut healthy, "start").await;

    // (a) Garbage credential.
    let mark = server.log_mark();
    expect_rejected(&server, "this.is-not.a-jwt", GoodbyeReason::AuthFailed).await;
    server.wait_for_log_after(mark, "device rejected", STEP_TIMEOUT);
    healthy_still_works(&server, &mut healthy, "garbage-credential").await;

    // (b) Expired credential, correctly signed with the server's own key.
    let authority = DeviceAuthority::load_or_create(&data).expect("server's device key");
    let (expired, _) = authority.issue_until(HEALTHY, 0, unix_secs() - 3600);
    let mark = server.log_mark();
    let detail = expect_rejected(&server, &expired, GoodbyeReason::AuthFailed).await;
    assert!(detail.contains("expired"), "goodbye detail: {detail}");
    let log = server.wait_for_log_after(mark, "credential expired", STEP_TIMEOUT);
    assert!(log.contains("device rejected"), "log:\n{log}");
    healthy_still_works(&server, &mut healthy, "expired-credential").await;

    // (c) Revoked device: its live session is closed with CREDENTIAL_REVOKED, and its old
    // credential no longer logs in.
    let revoked_cred = server.issue("stolen-phone").await;
    let mut stolen = server
        .connect(&revoked_cred, 0)
        .await
        .expect("device connects before revocation");
    let revoked = within(
        "RevokeDevice",
        server.api().await.admin().revoke_device(RevokeDeviceRequest {
            device_id: "stolen-phone".into(),
        }),
    )
    .await
    .expect("RevokeDevice")
    .into_inner();
    assert!(
        revoked.session_closed,
        "RevokeDevice must report the live session closed"
    );
    match within("revoked session goodbye", stolen.next_push()).await {
        Err(ClientError::Goodbye { reason, .. }) => assert_eq!(reason, GoodbyeReason::CredentialRevoked),
        other => {
            panic!("live session of a revoked device: expected Goodbye CREDENTIAL_REVOKED, got {other:?}")
        }
    }
    let mark = server.log_mark();
    expect_rejected(&server, &revoked_cred, GoodbyeReason::CredentialRevoked).await;
    server.wait_for_log_after(mark, "credential revoked", STEP_TIMEOUT);
    healthy_still_works(&server, &mut healthy, "revoked-device").await;

    // (d) Malformed frame: length 3, then three bytes that are no protobuf.
    let mark = server.log_mark();
    let mut bytes = 3u32.to_be_bytes().to_vec();
    bytes.extend([0xff, 0xff, 0xff]);
    expect_protocol_error(&server, &bytes).await;
    server.wait_for_log_after(mark, "protocol error", STEP_TIMEOUT);
    healthy_still_works(&server, &mut healthy, "malformed-frame").await;

    // (e) Oversized frame: the length prefix alone is enough to be refused.
    let mark = server.log_mark();
    let detail = expect_protocol_error(&server, &10_000_000u32.to_be_bytes()).await;
    assert!(detail.contains("limit"), "goodbye detail: {detail}");
    let log = server.wait_for_log_after(mark, "protocol error", STEP_TIMEOUT);
    assert!(
        log.contains("10000000") && log.contains("limit"),
        "log should name the frame size and the limit:\n{log}"
    );
    healthy_still_works(&server, &mut healthy, "oversized-frame").await;

    // (f) TCP without a TLS ClientHello: dropped after the configured 300 ms handshake timeout.
    let mark = server.log_mark();
    let mut silent = TcpStream::connect(server.device_addr).await.expect("TCP connect");
    let mut byte = [0u8; 1];
    // 300 ms configured; 5 s is far below the 10 s default, so this also proves the config
    // file took effect.
    match tokio::time::timeout(Duration::from_secs(5), silent.read(&mut byte)).await {
        Ok(Ok(0) | Err(_)) => {}
        Ok(Ok(n)) => panic!("server sent {n} bytes to a client that never said ClientHello"),
        Err(_) => panic!("server kept a silent TCP connection open for 5 s (handshake timeout 300 ms)"),
    }
    let log = server.wait_for_log_after(mark, "TLS handshake timed out", STEP_TIMEOUT);
    assert!(log.contains("timeout_ms=300"), "log:\n{log}");
    healthy_still_works(&server, &mut healthy, "silent-tcp").await;

    // The healthy session never dropped: the server logged no end for it.
    let log = server.log();
    assert!(
        !log.lines()
            .any(|l| l.contains("session ended") && l.contains(HEALTHY)),
        "the healthy session ended:\n{log}"
    );
    within("healthy close", healthy.close()).await.unwrap();
}
