//! Session lifecycle over real TLS: replacement, heartbeats, credentials, hostile input,
//! graceful shutdown. Every bad client is followed by proof that a healthy session carries on.

use bytes::BufMut;
use push_proto::{
    device::GoodbyeReason,
    sender::{DeliveryState, RevokeDeviceRequest},
};
use push_server::{auth::unix_secs, client::ClientError};
use testkit::harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn goodbye_reason(r: Result<impl Sized, ClientError>) -> GoodbyeReason {
    match r {
        Err(ClientError::Goodbye { reason, .. }) => reason,
        Err(e) => panic!("expected a goodbye, got {e}"),
        Ok(_) => panic!("expected a goodbye, got success"),
    }
}

/// A healthy session still receives messages.
async fn assert_alive(h: &Harness, phone: &mut push_server::client::DeviceClient, device_id: &str) {
    let sent = h.send(device_id, "still here?").await;
    let p = next(phone).await;
    assert_eq!(p.id, sent.message_id);
    phone.ack(&[p.seq]).await.unwrap();
}

#[tokio::test]
async fn second_login_replaces_the_first() {
    let h = Harness::start().await;
    let credential = h.issue("phone-1", &[]).await;
    let mut old = h.connect(&credential, 0).await.unwrap();
    let mut new = h.connect(&credential, 0).await.unwrap();
    assert_ne!(old.server_hello.session_id, new.server_hello.session_id);
    assert_eq!(
        goodbye_reason(within(old.next_push()).await),
        GoodbyeReason::Replaced
    );
    assert_alive(&h, &mut new, "phone-1").await;
    let devices = h.list_devices("", false).await;
    assert_eq!(devices.len(), 1);
    assert!(
        devices[0].online,
        "the replaced session's end must not mark the device offline"
    );
}

#[tokio::test]
async fn heartbeat_deadline_marks_a_silent_device_offline() {
    let h = Harness::start_with(|c| {
        c.heartbeat_interval_ms = 200;
        c.heartbeat_timeout_ms = 300;
    })
    .await;
    let mut presence = h.presence().await;
    let mut alive = h.device("alive").await;
    let mut silent = h.device("silent").await;
    silent.auto_heartbeat = false;
    // The responsive device answers heartbeats while it waits for a push.
    let alive_task = tokio::spawn(async move {
        let p = alive.next_push().await.unwrap();
        (alive, p)
    });
    let offline = within(async {
        loop {
            let e = presence.message().await.unwrap().unwrap();
            if e.device_id == "silent" && !e.online {
                return e;
            }
        }
    })
    .await;
    assert_eq!(offline.reason, "heartbeat timeout");
    assert_eq!(
        goodbye_reason(within(silent.next_push()).await),
        GoodbyeReason::HeartbeatTimeout
    );
    let sent = h.send("alive", "ping").await;
    let (_, p) = within(alive_task).await.unwrap();
    assert_eq!(
        p.id, sent.message_id,
        "a device that answers heartbeats stays connected"
    );
    let devices = h.list_devices("", false).await;
    let silent = devices.iter().find(|d| d.device_id == "silent").unwrap();
    assert!(!silent.online);
    assert_eq!(silent.last_disconnect_reason, "heartbeat timeout");
}

#[tokio::test]
async fn bad_expired_and_revoked_credentials_are_refused() {
    let h = Harness::start().await;
    let mut healthy = h.device("healthy").await;

    assert_eq!(
        goodbye_reason(h.connect("not-a-jwt", 0).await),
        GoodbyeReason::AuthFailed
    );
    assert_alive(&h, &mut healthy, "healthy").await;

    h.issue("phone-1", &[]).await;
    let (expired, _) = h.authority().issue_until("phone-1", 0, unix_secs() - 5);
    match h.connect(&expired, 0).await {
        Err(ClientError::Goodbye { reason, detail }) => {
            assert_eq!(reason, GoodbyeReason::AuthFailed);
            assert_eq!(detail, "credential expired");
        }
        other => panic!("expired credential accepted: {:?}", other.err()),
    }
    let (unknown, _) = h.authority().issue("never-registered", 0, 60);
    assert_eq!(
        goodbye_reason(h.connect(&unknown, 0).await),
        GoodbyeReason::AuthFailed
    );
    assert_alive(&h, &mut healthy, "healthy").await;

    // Revoking closes the live session, refuses the old credential and reports the queue.
    let credential = h.issue("phone-2", &[]).await;
    let mut phone = h.connect(&credential, 0).await.unwrap();
    let delivered = h.send("phone-2", "delivered").await;
    let phone_seen = next(&mut phone).await.seq;
    assert_eq!(delivered.recipients.len(), 1);
    let queued = h.send("phone-2", "queued, never acked").await;
    next(&mut phone).await;
    let revoked = h
        .admin()
        .revoke_device(RevokeDeviceRequest {
            device_id: "phone-2".into(),
        })
        .await
        .unwrap();
    assert!(revoked.into_inner().session_closed);
    assert_eq!(
        goodbye_reason(within(phone.next_push()).await),
        GoodbyeReason::CredentialRevoked
    );
    assert_eq!(
        goodbye_reason(h.connect(&credential, phone_seen).await),
        GoodbyeReason::CredentialRevoked
    );
    let updates = h
        .await_state(&queued.message_id, "phone-2", DeliveryState::Undeliverable)
        .await;
    assert_eq!(updates.last().unwrap().reason, "device revoked");
    // Re-enrolment issues a newer credential that works; the old one stays revoked.
    let fresh = h.issue("phone-2", &[]).await;
    h.connect(&fresh, phone_seen).await.unwrap();
    assert_eq!(
        goodbye_reason(h.connect(&credential, phone_seen).await),
        GoodbyeReason::CredentialRevoked
    );
    assert_alive(&h, &mut healthy, "healthy").await;
}

/// Open a raw TLS connection, write `bytes`, and return the goodbye the server answers with.
async fn raw_goodbye(h: &Harness, bytes: &[u8]) -> (GoodbyeReason, String) {
    let mut tls = push_server::client::DeviceClient::open(&h.options("", 0))
        .await
        .unwrap();
    tls.write_all(bytes).await.unwrap();
    tls.flush().await.unwrap();
    let mut buf = bytes::BytesMut::new();
    within(async {
        loop {
            if let Some(f) =
                push_proto::frame::decode::<push_proto::device::ServerFrame>(&mut buf, 1 << 16).unwrap()
            {
                let Some(push_proto::device::server_frame::Kind::Goodbye(g)) = f.kind else {
                    panic!("{f:?}")
                };
                // After the goodbye the server closes the connection.
                let mut rest = Vec::new();
                let _ = tls.read_to_end(&mut rest).await;
                return (g.reason(), g.detail);
            }
            assert!(
                tls.read_buf(&mut buf).await.unwrap() > 0,
                "closed without a goodbye"
            );
        }
    })
    .await
}

#[tokio::test]
async fn malformed_oversized_and_out_of_order_frames_end_only_that_session() {
    let h = Harness::start().await;
    let mut healthy = h.device("healthy").await;

    let mut garbage = Vec::new();
    garbage.put_u32(3);
    garbage.put_slice(&[0xff, 0xff, 0xff]);
    let (reason, detail) = raw_goodbye(&h, &garbage).await;
    assert_eq!(reason, GoodbyeReason::ProtocolError);
    assert!(detail.contains("malformed"), "{detail}");
    assert_alive(&h, &mut healthy, "healthy").await;

    let (reason, detail) = raw_goodbye(&h, &10_000_000u32.to_be_bytes()).await;
    assert_eq!(reason, GoodbyeReason::ProtocolError);
    assert!(detail.contains("exceeds"), "{detail}");
    assert_alive(&h, &mut healthy, "healthy").await;

    // An ack before the hello.
    let mut ack = bytes::BytesMut::new();
    let frame = push_proto::device::ClientFrame {
        kind: Some(push_proto::device::client_frame::Kind::Ack(Default::default())),
    };
    push_proto::frame::encode(&frame, &mut ack, 1 << 16).unwrap();
    let (reason, _) = raw_goodbye(&h, &ack).await;
    assert_eq!(reason, GoodbyeReason::ProtocolError);
    assert_alive(&h, &mut healthy, "healthy").await;
}

#[tokio::test]
async fn silent_clients_are_cut_off_at_handshake_and_hello_deadlines() {
    let h = Harness::start_with(|c| {
        c.limits.tls_handshake_timeout_ms = 300;
        c.limits.hello_timeout_ms = 300;
    })
    .await;
    let mut healthy = h.device("healthy").await;
    // TCP only, never a ClientHello: the server closes the socket after the handshake deadline.
    let mut tcp = tokio::net::TcpStream::connect(h.server.as_ref().unwrap().device_addr)
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = within(tcp.read(&mut buf)).await.unwrap_or(0);
    assert_eq!(n, 0, "half-open handshake must be closed by the server");
    // TLS but no hello.
    let (reason, detail) = raw_goodbye(&h, &[]).await;
    assert_eq!(
        (reason, detail.as_str()),
        (GoodbyeReason::ProtocolError, "no hello in time")
    );
    assert_alive(&h, &mut healthy, "healthy").await;
}

#[tokio::test]
async fn graceful_shutdown_says_goodbye_and_keeps_the_queue() {
    let mut h = Harness::start().await;
    let mut phone = h.device("phone-1").await;
    let offline_credential = h.issue("phone-2", &[]).await;
    let queued = h.send("phone-2", "survives").await;
    let waiting = tokio::spawn(async move { phone.next_push().await });
    h.shutdown().await;
    assert_eq!(
        goodbye_reason(within(waiting).await.unwrap()),
        GoodbyeReason::ServerShutdown
    );

    // Same data directory, new process state.
    h.restart().await;
    let mut phone2 = h.connect(&offline_credential, 0).await.unwrap();
    assert_eq!(next(&mut phone2).await.id, queued.message_id);
}
