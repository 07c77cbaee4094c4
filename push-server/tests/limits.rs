//! Abuse limits and field validation over real TLS: each abusive client is refused with a clear
//! error or a disconnect while a well-behaved phone on the same server keeps receiving.
//!
//! Rates are configured small with a refill of one per second or slower, and the tests assert
//! on outcomes ("refused within the next few attempts"), never on sleeps. Abusers connect from
//! their own loopback addresses (127.0.0.2 and up) so per-address limits do not touch the
//! healthy phone on 127.0.0.1.

use std::{net::SocketAddr, sync::Arc};

use push_proto::{
    device::{GoodbyeReason, Hello, NetworkChange, client_frame},
    sender::{
        DeviceList, GetMessageStatusRequest, ListDevicesRequest, SendMessageRequest, Target,
        push_sender_client::PushSenderClient, target,
    },
};
use push_server::{
    client::{ClientError, DeviceClient},
    config::HandshakeLimits,
};
use testkit::harness::{Harness, OPEN_HANDSHAKES, WAIT, next, to, within};
use tokio::{
    io::AsyncReadExt,
    net::{TcpSocket, TcpStream},
};
use tokio_rustls::{TlsConnector, client::TlsStream};

/// A TCP connection to `addr` from the loopback address `src`.
async fn tcp_from(src: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{src}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// A TLS handshake with `addr` from `src` (no ALPN, which every listener accepts).
async fn tls_from(src: &str, addr: SocketAddr, ca: &str) -> std::io::Result<TlsStream<TcpStream>> {
    let mut config = push_server::pki::client_config(ca).unwrap();
    config.alpn_protocols.clear();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tcp = tcp_from(src, addr).await;
    within(TlsConnector::from(Arc::new(config)).connect(name, tcp)).await
}

/// A device connection from `src` that completes its handshake and hello (refused: the
/// credential is junk), so the server is done with its handshake before this returns.
async fn login_attempt_from(src: &str, addr: SocketAddr, ca: &str) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut tls = tls_from(src, addr, ca).await?;
    let hello = push_proto::device::ClientFrame {
        kind: Some(client_frame::Kind::Hello(Hello {
            credential: "junk".into(),
            ..Hello::default()
        })),
    };
    let mut out = bytes::BytesMut::new();
    push_proto::frame::encode(&hello, &mut out, push_proto::frame::DEFAULT_MAX_FRAME).unwrap();
    tls.write_all(&out).await?;
    tls.flush().await?;
    let mut answer = Vec::new();
    let _ = within(tls.read_to_end(&mut answer)).await;
    assert!(!answer.is_empty(), "no goodbye");
    Ok(())
}

/// The server closes `tcp` at once, without a TLS handshake (it never answers a byte).
async fn assert_closed_at_once(mut tcp: TcpStream, what: &str) {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(WAIT, tcp.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("{what}: the server sent {n} bytes instead of closing"),
        Err(_) => panic!("{what}: the connection was not closed"),
    }
}

/// The healthy phone gets a message sent now.
async fn assert_alive(h: &Harness, phone: &mut DeviceClient, device_id: &str, step: &str) {
    let sent = h.send(device_id, step).await;
    let p = next(phone).await;
    assert_eq!(p.id, sent.message_id, "after {step}");
    phone.ack(&[p.seq]).await.unwrap();
}

/// The value of one counter series in `/metrics` (0 when absent).
async fn counter(h: &Harness, series: &str) -> f64 {
    let bearer = format!("Bearer {}", h.admin_key());
    let (status, _, body) = h
        .https("GET", "/metrics", &[("authorization", &bearer)], "")
        .await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::test]
async fn device_listener_refuses_an_address_over_its_handshake_limits() {
    let h = Harness::start_with(|c| {
        c.limits.device_handshakes = HandshakeLimits {
            in_progress_per_ip: 2,
            per_sec_per_ip: 1,
            burst_per_ip: 3,
            ..OPEN_HANDSHAKES
        }
    })
    .await;
    let addr = h.server.as_ref().unwrap().device_addr;
    let mut healthy = h.device("healthy").await;

    // Two silent connections hold the address's two handshakes in progress; a third is closed
    // before any TLS byte.
    let _silent = [
        tcp_from("127.0.0.2", addr).await,
        tcp_from("127.0.0.2", addr).await,
    ];
    assert_closed_at_once(tcp_from("127.0.0.2", addr).await, "third handshake in progress").await;
    assert_alive(&h, &mut healthy, "healthy", "in-progress abuse").await;

    // Another address completing handshakes in a loop: its bucket of 3, then refused.
    let mut done = 0;
    let refused_at = loop {
        match login_attempt_from("127.0.0.3", addr, &h.ca).await {
            Ok(_) => done += 1,
            Err(_) => break done,
        }
        assert!(done < 6, "no refusal after {done} handshakes in a row");
    };
    assert!(
        refused_at >= 3,
        "refused after {refused_at} handshakes; the bucket holds 3"
    );
    assert_alive(&h, &mut healthy, "healthy", "rate abuse").await;
    // The healthy address still connects.
    let again = h.issue("healthy-2", &[]).await;
    h.connect(&again, 0)
        .await
        .expect("a new phone from another address connects");

    let refused =
        |reason: &str| format!("lpush_handshakes_refused_total{{listener=\"device\",reason=\"{reason}\"}}");
    assert!(counter(&h, &refused("in_progress_per_ip")).await >= 1.0);
    assert!(counter(&h, &refused("rate_per_ip")).await >= 1.0);
}

#[tokio::test]
async fn api_and_dashboard_listeners_have_handshake_limits_too() {
    let h = Harness::start_with(|c| {
        c.limits.api_handshakes = HandshakeLimits {
            in_progress: 2,
            ..OPEN_HANDSHAKES
        };
        c.limits.http_handshakes = HandshakeLimits {
            per_sec: 1,
            burst: 2,
            ..OPEN_HANDSHAKES
        };
    })
    .await;
    let server = h.server.as_ref().unwrap();
    let (api, http) = (server.api_addr, server.http_addr);
    let mut healthy = h.device("healthy").await;

    // API: two silent connections fill the listener's handshakes in progress, from any
    // address; the next is closed at once, while the sender's open connection keeps working.
    let _silent = [tcp_from("127.0.0.2", api).await, tcp_from("127.0.0.3", api).await];
    assert_closed_at_once(tcp_from("127.0.0.4", api).await, "API handshake over in_progress").await;
    assert_alive(&h, &mut healthy, "healthy", "API in-progress abuse").await;

    // Dashboard: a shared bucket of 2; a client looping on handshakes is refused soon after.
    let mut done = 0;
    while tls_from("127.0.0.5", http, &h.ca).await.is_ok() {
        done += 1;
        assert!(done < 5, "no refusal after {done} dashboard handshakes");
    }
    assert!(done >= 2, "refused after {done}; the bucket holds 2");
    assert_alive(&h, &mut healthy, "healthy", "dashboard rate abuse").await;
}

#[tokio::test]
async fn a_device_logging_in_in_a_loop_is_told_overloaded_while_others_log_in() {
    let h = Harness::start_with(|c| {
        c.limits.device_logins_per_minute = 1;
        c.limits.device_login_burst = 3;
    })
    .await;
    let mut healthy = h.device("healthy").await;
    let looping = h.issue("crash-loop", &[]).await;
    let mut accepted = 0;
    let detail = loop {
        match h.connect(&looping, 0).await {
            Ok(_) => accepted += 1,
            Err(ClientError::Goodbye { reason, detail }) => {
                assert_eq!(reason, GoodbyeReason::Overloaded, "{detail}");
                break detail;
            }
            Err(e) => panic!("expected Goodbye OVERLOADED, got {e}"),
        }
        assert!(accepted < 5, "no refusal after {accepted} logins");
    };
    assert!(accepted >= 3, "refused after {accepted} logins; the burst is 3");
    assert!(detail.contains("too many logins"), "{detail}");
    assert_alive(&h, &mut healthy, "healthy", "login loop").await;
    // Other devices still log in.
    let other = h.issue("other", &[]).await;
    h.connect(&other, 0).await.expect("another device logs in");
}

#[tokio::test]
async fn an_api_key_over_its_rate_is_answered_resource_exhausted() {
    let h = Harness::start_with(|c| {
        c.limits.api_requests_per_sec_per_key = 1;
        c.limits.api_request_burst_per_key = 5;
    })
    .await;
    let mut healthy = h.device("healthy").await;
    let noisy = h
        .client(&h.create_key("noisy", &["read"], &[]).await.api_key)
        .await;
    let mut ok = 0;
    let status = loop {
        match noisy.sender().list_devices(ListDevicesRequest::default()).await {
            Ok(_) => ok += 1,
            Err(s) => break s,
        }
        assert!(ok < 8, "no refusal after {ok} requests");
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(ok >= 5, "refused after {ok}; the burst is 5");
    // Another key is not affected.
    assert_alive(&h, &mut healthy, "healthy", "API key over its rate").await;
}

#[tokio::test]
async fn device_ids_and_priorities_from_senders_are_validated() {
    let h = Harness::start().await;
    let mut healthy = h.device("healthy").await;
    let long = "x".repeat(10_000);
    let invalid = |target: target::Kind, priority: i32| SendMessageRequest {
        target: Some(Target { kind: Some(target) }),
        body: "hi".into(),
        priority,
        ..Default::default()
    };
    for (what, req) in [
        (
            "10 KB device id",
            invalid(target::Kind::DeviceId(long.clone()), 0),
        ),
        (
            "10 KB id in a list",
            invalid(
                target::Kind::Devices(DeviceList {
                    device_ids: vec!["healthy".into(), long.clone()],
                }),
                0,
            ),
        ),
        (
            "control character",
            invalid(target::Kind::DeviceId("a\nb".into()), 0),
        ),
        ("10 KB group", invalid(target::Kind::Group(long.clone()), 0)),
        (
            "priority 99",
            invalid(target::Kind::DeviceId("healthy".into()), 99),
        ),
    ] {
        let status = h.try_send(req).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{what}: {status:?}");
    }
    // Nothing of the above reached the phone: the next push is the one sent now.
    assert_alive(&h, &mut healthy, "healthy", "invalid sends").await;
    // Known priorities pass.
    h.send_req(SendMessageRequest {
        priority: 2,
        ..invalid(target::Kind::DeviceId("healthy".into()), 2)
    })
    .await;
    next(&mut healthy).await;
}

#[tokio::test]
async fn oversized_hello_and_network_change_fields_are_refused_and_change_nothing() {
    let h = Harness::start().await;
    let mut healthy = h.device("healthy").await;
    let credential = h.issue("phone-1", &[]).await;
    h.connect(&credential, 0).await.unwrap().close().await.unwrap();

    type Mutate = fn(&mut Hello);
    let cases: [(&str, Mutate); 3] = [
        ("ssid", |hello| hello.ssid = "s".repeat(3000)),
        ("instance_id", |hello| hello.instance_id = "i".repeat(10_000)),
        ("sdk_version", |hello| hello.sdk_version = "v".repeat(10_000)),
    ];
    for (field, mutate) in cases {
        let mut opts = h.options(&credential, 0);
        mutate(&mut opts.hello);
        match within(DeviceClient::connect(opts)).await {
            Err(ClientError::Goodbye { reason, detail }) => {
                assert_eq!(reason, GoodbyeReason::ProtocolError, "{detail}");
                assert!(detail.contains(field), "{field}: {detail}");
            }
            other => panic!("{field}: expected Goodbye PROTOCOL_ERROR, got {:?}", other.err()),
        }
    }
    // A 33-byte SSID in NetworkChange ends the session.
    let mut phone = h.connect(&credential, 0).await.unwrap();
    phone
        .send(client_frame::Kind::NetworkChange(NetworkChange {
            ssid: "n".repeat(33),
            path_lost: false,
        }))
        .await
        .unwrap();
    match within(phone.next_push()).await {
        Err(ClientError::Goodbye { reason, .. }) => assert_eq!(reason, GoodbyeReason::ProtocolError),
        other => panic!("expected Goodbye PROTOCOL_ERROR, got {other:?}"),
    }
    let listed = h.list_devices("", false).await;
    let phone_1 = listed.iter().find(|d| d.device_id == "phone-1").unwrap();
    assert_eq!(phone_1.ssid, "Ward 4B", "the refused SSIDs were not stored");
    assert!(listed.iter().all(|d| d.sdk_version.len() <= 64));
    assert_alive(&h, &mut healthy, "healthy", "oversized fields").await;
}

#[tokio::test]
async fn a_refused_credential_learns_nothing_of_the_verifier() {
    let h = Harness::start().await;
    let mut healthy = h.device("healthy").await;
    // alg "none", then a token whose payload is not JSON: the verifier's own messages name
    // the accepted algorithms and JSON positions.
    for credential in [
        "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",
        "eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.c2ln",
    ] {
        match h.connect(credential, 0).await {
            Err(ClientError::Goodbye { reason, detail }) => {
                assert_eq!(reason, GoodbyeReason::AuthFailed);
                assert_eq!(detail, "credential refused");
            }
            other => panic!("expected Goodbye AUTH_FAILED, got {:?}", other.err()),
        }
    }
    assert_alive(&h, &mut healthy, "healthy", "bad credentials").await;
}

#[tokio::test]
async fn grpc_follows_the_conventions() {
    let h = Harness::start().await;
    let mut healthy = h.device("healthy").await;

    // Over the message size limit (4 MiB): RESOURCE_EXHAUSTED.
    let status = h
        .try_send(SendMessageRequest {
            target: Some(to("healthy")),
            body: "x".repeat(5 << 20),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");

    // The authorization scheme is case-insensitive.
    let key = h.admin_key();
    let lower = move |mut req: tonic::Request<()>| {
        req.metadata_mut()
            .insert("authorization", format!("bearer {key}").parse().unwrap());
        Ok(req)
    };
    PushSenderClient::with_interceptor(h.api.channel(), lower)
        .list_devices(ListDevicesRequest::default())
        .await
        .expect("`bearer` is accepted");

    // Reflection v1alpha, for older grpcurl and grpcio clients.
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(h.api.channel())
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = within(responses.message())
        .await
        .unwrap()
        .unwrap()
        .message_response
    else {
        panic!("unexpected reflection answer");
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "lpush.sender.v1.PushSender")
    );
    assert_alive(&h, &mut healthy, "healthy", "conventions").await;
}

#[tokio::test]
async fn the_apns_bridge_link_accepts_tls_1_3_only() {
    use apns_bridge::{
        Bridge, BridgeSettings, BundleId,
        fake::FakeApns,
        remote::{self, TlsIdentity},
    };
    let dir = tempfile::tempdir().unwrap();
    let (pki, _) = push_server::pki::load_or_create(&dir.path().join("tls"), &[]).unwrap();
    let bundle = BundleId::parse("com.example.ward").unwrap();
    let bridge = Arc::new(Bridge::new(
        FakeApns::new(bundle.clone()),
        BridgeSettings::new(bundle),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let tls = TlsIdentity {
        cert_pem: pki.server_cert_pem.clone(),
        key_pem: pki.server_key_pem.clone(),
    };
    tokio::spawn(remote::serve(listener, bridge, "bridge-key", Some(tls), async {
        let _ = stopped.await;
    }));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();

    // A client that speaks TLS 1.2 only is refused in the handshake.
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pki.ca_cert_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls12 =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let refused = within(TlsConnector::from(Arc::new(tls12)).connect(name.clone(), tcp)).await;
    assert!(refused.is_err(), "a TLS 1.2 client was accepted");

    // TLS 1.3 is accepted.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls13 = push_server::pki::client_config(&pki.ca_cert_pem).unwrap();
    tls13.alpn_protocols = vec![b"h2".to_vec()];
    let ok = within(TlsConnector::from(Arc::new(tls13)).connect(name, tcp)).await;
    let ok = ok.expect("TLS 1.3 accepted");
    assert_eq!(
        ok.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let _ = stop.send(());
}

#[tokio::test]
async fn watchers_of_one_id_are_bounded_and_one_whose_client_went_frees_its_place() {
    let h = Harness::start_with(|c| c.limits.max_watchers_per_id = 2).await;
    // Registered, never online: the message stays ACCEPTED, so its watchers stay open.
    h.issue("away", &[]).await;
    let id = h.send("away", "hello").await.message_id;
    let watch = || {
        let (mut sender, message_id) = (h.sender(), id.clone());
        async move { sender.watch_message(GetMessageStatusRequest { message_id }).await }
    };
    let first = watch().await.expect("first watcher");
    let _second = watch().await.expect("second watcher");
    let refused = watch().await.expect_err("a third watcher of one id");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    drop(first);
    // The server frees the place as soon as it sees the stream reset, without a receipt of the
    // message to wake its watcher.
    within(async {
        loop {
            match watch().await {
                Ok(_) => return,
                Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await
                }
                Err(s) => panic!("{s:?}"),
            }
        }
    })
    .await;
}
