//! The APNs bridge as its own process (`apns-bridge serve --fake-apns`, TLS, API key) behind the
//! real `push-server` binary in remote mode: the same routing as embedded (see
//! `push-server/tests/voip.rs`), across processes. The fake APNs inside the bridge prints every
//! request it receives; those lines are what "a VoIP push was sent" means here.

use e2e::{BridgeProcess, STEP_TIMEOUT, ServerProcess, within};
use push_proto::sender::{
    DeliveryState, DeliveryUpdate, ListDevicesRequest, PlaceCallRequest, SendMessageRequest,
    SetVoipTokenRequest, Target, VoipTokenState, WatchCallRequest, target,
};

fn token(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

/// The next request the fake APNs received.
fn next_push(bridge: &BridgeProcess) -> String {
    bridge
        .next_request(STEP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn to(device_id: &str) -> Target {
    Target {
        kind: Some(target::Kind::DeviceId(device_id.into())),
    }
}

async fn watch_until(
    server: &ServerProcess,
    call_id: &str,
    done: impl Fn(&DeliveryUpdate) -> bool,
) -> Vec<DeliveryUpdate> {
    let mut stream = server
        .api()
        .await
        .sender()
        .watch_call(WatchCallRequest {
            call_id: call_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    within("watch call", async {
        while let Some(u) = stream.message().await.unwrap() {
            let finished = done(&u);
            seen.push(u);
            if finished {
                return;
            }
        }
    })
    .await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_as_a_separate_process_rings_reports_and_invalidates_like_embedded() {
    let tmp = tempfile::tempdir().unwrap();
    let bridge = BridgeProcess::start(
        tmp.path(),
        &["--fake-response".into(), format!("{}=410:Unregistered", token(2))],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        bridge.ready_line().contains("transport=tls"),
        "{}",
        bridge.ready_line()
    );
    let config = tmp.path().join("push.toml");
    std::fs::write(
        &config,
        format!("[limits]\ncall_ack_window_ms = 500\n\n{}", bridge.apns_config()),
    )
    .unwrap();
    let server = ServerProcess::start(&tmp.path().join("data"), &["--config", config.to_str().unwrap()]);
    let api = server.api().await;
    for (device, t) in [("phone-1", token(1)), ("phone-2", token(2))] {
        server.issue(device).await;
        api.admin()
            .set_voip_token(SetVoipTokenRequest {
                device_id: device.into(),
                token: t,
            })
            .await
            .unwrap();
    }
    let place = |call_id: &str, device: &str| PlaceCallRequest {
        call_id: call_id.into(),
        target: Some(to(device)),
        caller_name: "Dr. Okafor".into(),
        caller_handle: "ext 4411".into(),
        video: false,
        ring_timeout_seconds: 20,
        escalation: Vec::new(),
    };

    // No session: one VoIP push, reported with path "apns".
    api.sender().place_call(place("call-1", "phone-1")).await.unwrap();
    let line = next_push(&bridge);
    assert!(line.contains(&format!("token={}", token(1))), "{line}");
    assert!(line.contains("call=call-1"), "{line}");
    assert!(
        line.contains("push-type=voip") && line.contains("topic=com.example.ward.voip"),
        "{line}"
    );
    assert!(
        line.contains("priority=10") && line.contains("violations=[]"),
        "{line}"
    );
    let updates = watch_until(&server, "call-1", |u| u.path == "apns").await;
    assert_eq!(updates.last().unwrap().state(), DeliveryState::Delivered);

    // 410: the token is invalidated and the failed leg reported before the deadline; the call
    // keeps ringing on the local path until then.
    api.sender().place_call(place("call-2", "phone-2")).await.unwrap();
    let line = next_push(&bridge);
    assert!(line.contains("call=call-2") && line.contains("410"), "{line}");
    let updates = watch_until(&server, "call-2", |u| u.reason.contains("Unregistered")).await;
    assert_eq!(
        updates.last().unwrap().state(),
        DeliveryState::Accepted,
        "{updates:?}"
    );
    let devices = api
        .sender()
        .list_devices(ListDevicesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .devices;
    let phone2 = devices.iter().find(|d| d.device_id == "phone-2").unwrap();
    assert_eq!(phone2.voip_token(), VoipTokenState::Invalid);

    // A message never becomes a VoIP push: the next request the fake sees is the marker call.
    api.sender()
        .send_message(SendMessageRequest {
            target: Some(to("phone-1")),
            body: "bed 12".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    api.sender().place_call(place("call-3", "phone-1")).await.unwrap();
    let line = next_push(&bridge);
    assert!(line.contains("call=call-3"), "the message went to APNs? {line}");
}
