//! Writes the seed corpora (`corpus/<target>/seed-*`) from real traffic: the SDK core and the
//! server's session core talk to each other through a real hub over a real store, and every
//! frame either side writes is recorded, as are the scripts of that exchange for the stateful
//! targets. The enrollment JSON, the plist and the configuration come from the real enroller
//! and the README. Run it after changing the protocol: `fuzz/write-seeds`.
//!
//! It is built like the targets (same flags, same target directory), so it reuses their
//! instrumented dependencies instead of building everything a second time; the instrumented
//! code needs libFuzzer's coverage hooks, hence the empty `fuzz_target!` that links them.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use lpush_fuzz::{ScriptWriter, admin_in, hub_in, hub_tag, runtime, scratch_dir, sdk_tag, session_tag};
use mobile_sdk::core::{Config as SdkConfig, Session as SdkSession, StopReason};
use push_proto::{
    device::{CancelReason, ClientFrame, ServerFrame, client_frame},
    frame::{self, DEFAULT_MAX_FRAME},
};
use push_server::{
    api::enrollment::{Caller, Enroller, SiteProfile},
    auth::{DeviceAuthority, DeviceClaims},
    config::{Config, Limits},
    hub::{CallRequest, MessageRequest},
    pki,
    session::core::{Event as ServerEvent, Session as ServerSession, Timing, Welcome},
    store::Store,
};

fn corpus(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(target: &str, name: &str, data: &[u8]) {
    std::fs::write(corpus(target).join(format!("seed-{name}")), data).unwrap();
}

/// What one recorded exchange produced.
#[derive(Default)]
struct Recording {
    /// Every frame the device wrote, in order, with a name.
    device: Vec<(String, Bytes)>,
    /// Every frame the server wrote.
    server: Vec<(String, Bytes)>,
    /// The `session_core` script: the device's bytes and the hub's decisions.
    session_script: ScriptWriter,
    /// The `sdk_core` script: the host's calls and the server's bytes.
    sdk_script: ScriptWriter,
    /// The `hub` script: the hub calls the session driver made.
    hub_script: ScriptWriter,
}

fn name_client(f: &ClientFrame) -> String {
    match &f.kind {
        Some(client_frame::Kind::Hello(_)) => "hello",
        Some(client_frame::Kind::Ack(_)) => "ack",
        Some(client_frame::Kind::HeartbeatReply(_)) => "heartbeat-reply",
        Some(client_frame::Kind::NetworkChange(_)) => "network-change",
        Some(client_frame::Kind::VoipToken(_)) => "voip-token",
        Some(client_frame::Kind::Goodbye(_)) => "goodbye",
        Some(client_frame::Kind::CallOutcome(_)) => "call-outcome",
        None => "empty",
    }
    .into()
}

fn name_server(f: &ServerFrame) -> String {
    use push_proto::device::{push::Body, server_frame::Kind};
    match &f.kind {
        Some(Kind::ServerHello(_)) => "server-hello",
        Some(Kind::Push(p)) => match p.body {
            Some(Body::Message(_)) => "push-message",
            Some(Body::CallInvite(_)) => "push-call-invite",
            Some(Body::CallCancel(_)) => "push-call-cancel",
            None => "push-empty",
        },
        Some(Kind::Heartbeat(_)) => "heartbeat",
        Some(Kind::Goodbye(_)) => "goodbye",
        Some(Kind::CallOutcomeReply(_)) => "call-outcome-reply",
        None => "empty",
    }
    .into()
}

/// The frames in `bytes`, each with its own bytes.
fn frames<M: prost::Message + Default>(bytes: &[u8]) -> Vec<(M, Bytes)> {
    let mut buf = BytesMut::from(bytes);
    let mut frames = Vec::new();
    while let Some(f) = frame::decode::<M>(&mut buf, DEFAULT_MAX_FRAME).unwrap() {
        let mut one = BytesMut::new();
        frame::encode(&f, &mut one, DEFAULT_MAX_FRAME).unwrap();
        frames.push((f, one.freeze()));
    }
    frames
}

/// One device's session through the real cores and hub: hello, replay of queued messages, a
/// call and its cancel, the app taking them, acks, a heartbeat, a network change, and the host
/// stopping the provider.
fn record(last_seen_seq: u64, queued: u8) -> Recording {
    let dir = scratch_dir();
    let rt = runtime();
    let _enter = rt.enter();
    let (hub, store) = hub_in(dir.path(), Limits::default());
    let generation = rt
        .block_on(hub.register_device("phone-1", vec!["ward:4B".into()]))
        .unwrap();
    let mut rec = Recording::default();
    rec.hub_script.u8(queued);
    for i in 0..queued {
        let req = MessageRequest {
            device_ids: vec!["phone-1".into()],
            title: format!("Bed {}", 10 + i),
            body: "Patient asks for you".into(),
            ..Default::default()
        };
        rt.block_on(hub.send_message(req)).unwrap();
    }
    let timing = Timing {
        hello_timeout: Duration::from_secs(10),
        heartbeat_interval: Duration::from_secs(30),
        heartbeat_timeout: Duration::from_secs(10),
    };
    rec.session_script.u16(9_999).u16(29_999).u16(9_999);
    rec.sdk_script.u16(last_seen_seq as u16).u8(255);
    let t0 = Instant::now();
    let mut server = ServerSession::new(t0, timing, DEFAULT_MAX_FRAME);
    let mut config = SdkConfig::new("header.claims.signature");
    config.last_seen.seq = last_seen_seq;
    config.ssid = "Ward 4B".into();
    let mut sdk = SdkSession::new(config);
    sdk.handle_start(t0);
    rec.sdk_script.u8(sdk_tag::START);
    sdk.handle_connected(t0, 0);
    rec.sdk_script.u8(sdk_tag::CONNECTED);

    let mut session_id = 0;
    let mut last_taken = 0;
    let mut elapsed = Duration::ZERO;
    // Rounds of: device bytes to the server, hub decisions, server bytes to the device.
    for round in 0..6 {
        while let Some(bytes) = sdk.poll_transmit() {
            for (f, one) in frames::<ClientFrame>(&bytes) {
                rec.device.push((name_client(&f), one));
            }
            server.handle_bytes(t0 + elapsed, &bytes);
            rec.session_script.u8(session_tag::BYTES).bytes(&bytes);
        }
        while sdk.poll_transport().is_some() {}
        while let Some(e) = server.poll_event() {
            match e {
                ServerEvent::Hello(hello) => {
                    let claims = DeviceClaims {
                        sub: "phone-1".into(),
                        generation,
                        iat: 0,
                        exp: u64::MAX,
                        aud: "lpush-device".into(),
                    };
                    let login = hub.login(&claims, &hello).unwrap();
                    rec.hub_script
                        .u8(hub_tag::LOGIN)
                        .u64(hello.last_seen_seq)
                        .u64(hello.epoch)
                        .string(&hello.ssid)
                        .string(&hello.instance_id)
                        .u8(0);
                    session_id = login.session_id;
                    last_taken = hello.last_seen_seq;
                    let welcome = Welcome {
                        session_id,
                        device_id: claims.sub,
                        replay_count: login.replay_count,
                        epoch: hub.epoch(),
                        server_time_ms: push_server::hub::now_ms(),
                    };
                    server.accept(t0 + elapsed, welcome, hello.last_seen_seq);
                    rec.session_script
                        .u8(session_tag::ACCEPT)
                        .u64(hello.last_seen_seq);
                }
                ServerEvent::Acked(ack) => {
                    hub.ack("phone-1", session_id, ack.up_to_seq, &ack.seqs);
                    rec.hub_script
                        .u8(hub_tag::ACK)
                        .u8(0)
                        .u64(ack.up_to_seq)
                        .seqs(&ack.seqs);
                }
                _ => {}
            }
        }
        if round == 1 {
            let call = CallRequest {
                call_id: "call-1".into(),
                device_ids: vec!["phone-1".into()],
                caller_name: "Dr. Okafor".into(),
                caller_handle: "ext 4411".into(),
                ..Default::default()
            };
            rt.block_on(hub.place_call(call)).unwrap();
            rec.hub_script.u8(hub_tag::CALL).u8(1).u8(0);
        }
        if round == 2 {
            rt.block_on(hub.cancel_call("call-1", CancelReason::CallerCancelled))
                .unwrap();
            rec.hub_script.u8(hub_tag::CANCEL).u8(1);
        }
        if server.is_established() {
            // Let the login's sequence reservation become durable, as the driver waits for it.
            rt.block_on(async {
                hub.register_device("other", Vec::new()).await.unwrap();
                for _ in 0..8 {
                    tokio::task::yield_now().await;
                }
            });
            rec.hub_script.u8(hub_tag::SETTLE);
            let pushes = hub.take_pushes("phone-1", session_id, last_taken, 64);
            rec.hub_script.u8(hub_tag::TAKE_NEXT).u8(0).u8(64);
            let seqs: Vec<u64> = pushes.iter().map(|p| p.seq()).collect();
            for p in pushes {
                last_taken = p.seq();
                rec.session_script.u8(session_tag::PUSH).u64(p.seq());
                server.push(p);
            }
            if !seqs.is_empty() {
                hub.mark_delivered("phone-1", &seqs);
                rec.hub_script.u8(hub_tag::MARK_DELIVERED).seqs(&seqs);
            }
        }
        if round == 3 {
            // Past the heartbeat interval: the server asks, the device answers.
            elapsed += Duration::from_secs(30);
            server.handle_timeout(t0 + elapsed);
            rec.session_script.u8(session_tag::ADVANCE).u16(30_000);
            rec.session_script.u8(session_tag::FIRE_TIMER);
        }
        for (f, one) in frames::<ServerFrame>(&server.poll_transmit().unwrap_or_default()) {
            rec.server.push((name_server(&f), one.clone()));
            sdk.handle_bytes(t0 + elapsed, &one);
            rec.sdk_script.u8(sdk_tag::BYTES).bytes(&one);
        }
        while let Some(e) = sdk.poll_event() {
            if let Some(seq) = e.push_seq() {
                sdk.handle_delivered(t0 + elapsed, seq);
                rec.sdk_script.u8(sdk_tag::DELIVERED_ANY).u64(seq);
            }
        }
        if round == 2 {
            sdk.handle_network(
                t0 + elapsed,
                mobile_sdk::core::NetworkEvent::Joined {
                    ssid: "Station Ünfall".into(),
                },
            );
            rec.sdk_script.u8(sdk_tag::JOINED).string("Station Ünfall");
            sdk.handle_voip_token(t0 + elapsed, "ab".repeat(32));
            rec.sdk_script.u8(sdk_tag::VOIP_TOKEN).string(&"ab".repeat(32));
        }
        if round == 4 {
            sdk.handle_stop(t0 + elapsed, StopReason::HostRequested);
            rec.sdk_script.u8(sdk_tag::STOP).u8(0);
        }
    }
    hub.logout("phone-1", session_id, "client stopping");
    rec.hub_script.u8(hub_tag::LOGOUT).u8(0);
    drop(hub);
    store.close();
    rec
}

libfuzzer_sys::fuzz_target!(|_data: &[u8]| {});

fn main() {
    for (i, (last_seen, queued)) in [(0, 3), (2, 3), (0, 0)].into_iter().enumerate() {
        let rec = record(last_seen, queued);
        let mut session = Vec::new();
        for (n, (name, bytes)) in rec.device.iter().chain(&rec.server).enumerate() {
            // The frame target reads a limit byte (0: the default) and a chunking byte first.
            let mut seed = vec![0, 0];
            seed.extend_from_slice(bytes);
            write("frame", &format!("{i}-{n:02}-{name}"), &seed);
            session.extend_from_slice(bytes);
        }
        let mut whole = vec![0, 3];
        whole.extend_from_slice(&[1, 7, 2]);
        whole.extend_from_slice(&session);
        write("frame", &format!("{i}-session"), &whole);
        write("session_core", &format!("session-{i}"), &rec.session_script.0);
        write("sdk_core", &format!("session-{i}"), &rec.sdk_script.0);
        write("hub", &format!("session-{i}"), &rec.hub_script.0);
    }
    write_enrollment_and_plist();
    write_config();
}

fn write_enrollment_and_plist() {
    let dir = scratch_dir();
    let rt = runtime();
    let _enter = rt.enter();
    let (hub, store) = hub_in(dir.path(), Limits::default());
    let admin = admin_in(&rt, store);
    let auth = DeviceAuthority::load_or_create(dir.path()).unwrap();
    let names = vec!["push.ward.local".to_string()];
    let (pki, _) = pki::load_or_create(&dir.path().join("tls"), &names).unwrap();
    let mut cfg = Config {
        server_names: names,
        ..Config::default()
    };
    cfg.site.ssids = (1..=12).map(|i| format!("Ward {i}")).collect();
    let site = SiteProfile::new(&cfg, "0.0.0.0:7443".parse().unwrap(), &pki);
    let enroller = Enroller::new(hub, Arc::new(auth), site);
    let bodies = [
        (
            "full",
            r#"{"deviceId":"phone-1","groups":["ward:4B","icu"],"validDays":365}"#,
        ),
        ("minimal", r#"{"deviceId":"phone-2"}"#),
        ("unicode", r#"{"deviceId":"Station Ünfall 🚑","groups":[]}"#),
        ("unknown-key", r#"{"deviceId":"phone-3","admin":true}"#),
        ("bad-name", r#"{"deviceId":""}"#),
    ];
    for (name, body) in bodies {
        write("enrollment", name, body.as_bytes());
        let Ok(form) = serde_json::from_str::<push_server::api::enrollment::EnrollForm>(body) else {
            continue;
        };
        let Ok(enrollment) = rt.block_on(enroller.enroll(
            form.into(),
            Caller {
                key: &admin,
                source: None,
                via: "https",
            },
        )) else {
            continue;
        };
        let root = plist::Value::from_reader_xml(enrollment.plist.as_bytes()).unwrap();
        let provider = root
            .as_dictionary()
            .unwrap()
            .get("providerConfiguration")
            .unwrap();
        let mut xml = Vec::new();
        plist::to_writer_xml(&mut xml, provider).unwrap();
        write("plist", &format!("{name}.xml"), &xml);
        let mut binary = Vec::new();
        plist::to_writer_binary(&mut binary, provider).unwrap();
        write("plist", &format!("{name}.bplist"), &binary);
        write(
            "plist",
            &format!("{name}-enrollment.xml"),
            enrollment.plist.as_bytes(),
        );
    }
}

/// The README's example configuration, and each of its sections alone.
fn write_config() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let start = readme
        .find("```toml\n")
        .expect("the README shows a configuration")
        + 8;
    let toml = &readme[start..][..readme[start..].find("```").unwrap()];
    write("config", "readme", toml.as_bytes());
    for (i, section) in toml.split("\n[").enumerate().skip(1) {
        write(
            "config",
            &format!("readme-section-{i}"),
            format!("[{section}").as_bytes(),
        );
    }
    write("config", "empty", b"");
    write("config", "unknown-key", b"heartbeat_intervall_ms = 5\n");
    write(
        "config",
        "apns-remote",
        b"[apns]\nmode = \"remote\"\nendpoint = \"https://dmz:7446\"\n",
    );
}
