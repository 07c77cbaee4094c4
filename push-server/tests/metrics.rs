//! `/metrics` scraped after a scripted session: the values equal what the test did.
//!
//! The metrics recorder is process-wide, so this file holds exactly one test: nothing else in
//! this test binary records metrics.

use std::{collections::HashMap, sync::Arc, time::Duration};

use apns_bridge::{Bridge, BridgeSettings, BundleId, fake::FakeApns};
use push_proto::{
    device::{Push, push},
    sender::{DeliveryState, SetVoipTokenRequest},
};
use testkit::harness::*;

const BUNDLE: &str = "com.example.ward";

/// `name{label="v",...}` (labels sorted) -> value.
fn parse(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("series value");
        let key = match series.split_once('{') {
            Some((name, labels)) => {
                let mut labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                labels.sort();
                format!("{name}{{{}}}", labels.join(","))
            }
            None => series.to_string(),
        };
        out.insert(key, value.parse().expect("a number"));
    }
    out
}

fn value(m: &HashMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or_else(|| {
        let mut keys: Vec<_> = m.keys().filter(|k| k.starts_with("lpush_")).collect();
        keys.sort();
        panic!("{key} not exported; have {keys:#?}")
    })
}

#[tokio::test]
async fn metrics_match_a_scripted_session() {
    let fake = FakeApns::new(BundleId::parse(BUNDLE).unwrap());
    let mut settings = BridgeSettings::new(BundleId::parse(BUNDLE).unwrap());
    settings.send_timeout = Duration::from_secs(2);
    let h = Harness::start_with_voip(|_| {}, Some(Arc::new(Bridge::new(fake.clone(), settings)))).await;
    let key = h.admin_key();
    let bearer = format!("Bearer {key}");

    // Unauthenticated scrapes are refused.
    let (status, _, _) = h.https("GET", "/metrics", &[], "").await;
    assert_eq!(status, 401);

    // Two devices connect; phone-b has a PushKit token.
    let mut a = h.device("phone-a").await;
    let b = h.device("phone-b").await;
    h.admin()
        .set_voip_token(SetVoipTokenRequest {
            device_id: "phone-b".into(),
            token: "ab".repeat(32),
        })
        .await
        .unwrap();

    // N messages to phone-a, each received and acknowledged.
    const N: usize = 5;
    let mut ids = Vec::new();
    for i in 0..N {
        ids.push(h.send("phone-a", &format!("m{i}")).await.message_id);
    }
    for _ in 0..N {
        let p = next(&mut a).await;
        a.ack(&[p.seq]).await.unwrap();
    }
    for id in &ids {
        h.await_state(id, "phone-a", DeliveryState::Acked).await;
    }

    // phone-b drops (goodbye), then a call rings phone-a locally and phone-b through APNs.
    b.close().await.unwrap();
    within(async {
        while h.list_devices("", true).await.len() != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    h.place(call_to("call-1", "phone-a", "Dr. Okafor")).await.unwrap();
    let invite: Push = next(&mut a).await;
    assert!(matches!(invite.body, Some(push::Body::CallInvite(_))));
    a.ack(&[invite.seq]).await.unwrap();
    h.await_state("call-1", "phone-a", DeliveryState::Acked).await;
    h.place(call_to("call-2", "phone-b", "Dr. Okafor")).await.unwrap();
    h.await_update("call-2", "phone-b", |u| u.path == "apns").await;

    let (status, head, body) = h
        .https("GET", "/metrics", &[("authorization", &bearer)], "")
        .await;
    assert_eq!(status, 200, "{head}");
    let m = parse(&body);
    let n = N as f64;
    let expect = [
        ("lpush_tls_handshakes_total{result=\"ok\"}", 2.0),
        ("lpush_logins_total{result=\"ok\"}", 2.0),
        ("lpush_sessions_online", 1.0),
        ("lpush_devices_registered", 2.0),
        ("lpush_sessions_ended_total{reason=\"device_goodbye\"}", 1.0),
        ("lpush_heartbeat_misses_total", 0.0),
        ("lpush_pushes_accepted_total{kind=\"message\"}", n),
        ("lpush_pushes_accepted_total{kind=\"call_invite\"}", 2.0),
        ("lpush_pushes_delivered_total{kind=\"message\",path=\"local\"}", n),
        (
            "lpush_pushes_delivered_total{kind=\"call_invite\",path=\"local\"}",
            1.0,
        ),
        (
            "lpush_pushes_delivered_total{kind=\"call_invite\",path=\"apns\"}",
            1.0,
        ),
        ("lpush_pushes_final_total{kind=\"message\",state=\"acked\"}", n),
        (
            "lpush_pushes_final_total{kind=\"call_invite\",state=\"acked\"}",
            1.0,
        ),
        (
            "lpush_delivery_latency_seconds_count{kind=\"message\",path=\"local\"}",
            n,
        ),
        ("lpush_ack_latency_seconds_count{kind=\"message\"}", n),
        ("lpush_voip_pushes_total{outcome=\"delivered\"}", 1.0),
        ("lpush_voip_non_call_pushes_total", 0.0),
        // call-2 still rings phone-b (queued until its deadline).
        ("lpush_queued_pushes", 1.0),
        ("lpush_store_last_commit_ok", 1.0),
    ];
    for (key, want) in expect {
        assert_eq!(value(&m, key), want, "{key}");
    }
    assert!(value(&m, "lpush_store_commits_total{result=\"ok\"}") > 0.0);
    assert!(value(&m, "lpush_store_commit_seconds_count") > 0.0);
    assert!(
        body.contains("lpush_delivery_latency_seconds_bucket{"),
        "latency is a histogram"
    );
    assert_eq!(fake.received().len(), 1, "exactly one VoIP push, for the call");
}
