//! Cluster mode: two in-process nodes over real TLS sharing one real `redis-server`. Phones and
//! senders use whichever node they like; what one does, the other sees.

mod common;

use common::{Harness, next, to, within};
use push_proto::{
    device::{CancelReason, GoodbyeReason, push},
    sender::{CancelCallRequest, DeliveryState, PlaceCallRequest},
};
use push_server::{
    client::ClientError,
    testing::{RedisServer, copy_dir},
};

/// Two nodes on one Redis. Node B's data directory starts as a copy of node A's: every node of a
/// cluster needs the same CA and device-credential key (and here, the admin key file).
struct Cluster {
    a: Harness,
    b: Harness,
    redis: RedisServer,
}

impl Cluster {
    async fn start() -> Self {
        Self::on(RedisServer::start().expect("redis-server starts")).await
    }

    async fn on(redis: RedisServer) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let url = redis.url.clone();
        let a = Harness::start_with(|c| {
            c.cluster.redis_url = url.clone();
            c.node_name = "node-a".into();
        })
        .await;
        let from = a.cfg.data_dir.clone();
        let b = Harness::start_with(|c| {
            c.cluster.redis_url = url.clone();
            c.node_name = "node-b".into();
            copy_dir(&from, &c.data_dir).expect("copy node A's data directory");
        })
        .await;
        Self { a, b, redis }
    }
}

#[tokio::test]
async fn a_message_sent_on_one_node_reaches_a_phone_on_the_other_and_the_sender_sees_it_acked() {
    let c = Cluster::start().await;
    let credential = c.a.issue("phone-1", &["ward"]).await;
    let mut phone =
        c.b.connect(&credential, 0)
            .await
            .expect("phone connects to node B");
    let sent = c.a.send("phone-1", "bed 12 needs you").await;
    assert_eq!(sent.recipients[0].state(), DeliveryState::Accepted);
    let p = next(&mut phone).await;
    assert_eq!(p.id, sent.message_id);
    phone.ack(&[p.seq]).await.unwrap();
    let seen =
        c.a.await_state(&sent.message_id, "phone-1", DeliveryState::Acked)
            .await;
    assert!(
        seen.iter().all(|u| u.state() != DeliveryState::Expired),
        "{seen:?}"
    );
    let listed = c.a.list_devices("ward", false).await;
    assert_eq!(listed.len(), 1);
    assert!(listed[0].online);
    assert_eq!(
        listed[0].node, "node-b",
        "node A knows which node holds the phone"
    );
}

#[tokio::test]
async fn a_message_for_an_offline_phone_waits_in_redis_for_whichever_node_it_joins() {
    let c = Cluster::start().await;
    let credential = c.a.issue("phone-1", &[]).await;
    let sent = c.a.send("phone-1", "lab results").await;
    let mut phone = c.b.connect(&credential, 0).await.expect("connects to node B");
    let p = next(&mut phone).await;
    assert_eq!(p.id, sent.message_id);
    phone.ack(&[p.seq]).await.unwrap();
    c.b.await_state(&sent.message_id, "phone-1", DeliveryState::Acked)
        .await;
}

#[tokio::test]
async fn a_newer_login_on_another_node_takes_the_device_and_the_app_sees_each_push_once() {
    let c = Cluster::start().await;
    let credential = c.a.issue("phone-1", &[]).await;
    let mut old = c.a.connect(&credential, 0).await.expect("connects to node A");
    let first = c.a.send("phone-1", "first").await;
    let p = next(&mut old).await;
    assert_eq!(p.id, first.message_id);
    old.ack(&[p.seq]).await.unwrap();
    c.a.await_state(&first.message_id, "phone-1", DeliveryState::Acked)
        .await;
    // The phone moves to node B (a new Wi-Fi path, say), reporting what it saw.
    c.b.epoch.store(
        c.a.epoch.load(std::sync::atomic::Ordering::SeqCst),
        std::sync::atomic::Ordering::SeqCst,
    );
    let mut new = c.b.connect(&credential, p.seq).await.expect("connects to node B");
    match within(old.next_push()).await {
        Err(ClientError::Goodbye { reason, .. }) => assert_eq!(reason, GoodbyeReason::Replaced),
        other => panic!("node A's session must be told to go: {other:?}"),
    }
    let second = c.a.send("phone-1", "second").await;
    let q = next(&mut new).await;
    assert_eq!(
        q.id, second.message_id,
        "the acked push is not replayed on node B"
    );
    assert!(q.seq > p.seq, "numbers keep growing across nodes");
    new.ack(&[q.seq]).await.unwrap();
    c.a.await_state(&second.message_id, "phone-1", DeliveryState::Acked)
        .await;
}

#[tokio::test]
async fn a_call_placed_and_cancelled_on_one_node_rings_and_stops_on_the_other() {
    let c = Cluster::start().await;
    let credential = c.a.issue("phone-1", &[]).await;
    let mut phone = c.b.connect(&credential, 0).await.expect("connects to node B");
    c.a.sender()
        .place_call(PlaceCallRequest {
            call_id: "call-1".into(),
            target: Some(to("phone-1")),
            caller_name: "Ward 4B".into(),
            ring_timeout_seconds: 30,
            ..Default::default()
        })
        .await
        .unwrap();
    let invite = next(&mut phone).await;
    assert!(matches!(invite.body, Some(push::Body::CallInvite(_))));
    let cancelled =
        c.a.sender()
            .cancel_call(CancelCallRequest {
                call_id: "call-1".into(),
                reason: CancelReason::CallerCancelled as i32,
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(cancelled.cancels_sent, 1);
    let cancel = next(&mut phone).await;
    assert!(
        matches!(cancel.body, Some(push::Body::CallCancel(_))),
        "{cancel:?}"
    );
    c.a.await_state("call-1", "phone-1", DeliveryState::Cancelled)
        .await;
}

/// Poll `/healthz` of `h` until it answers `want` (each node checks Redis once a second).
async fn health_becomes(h: &Harness, want: u16) -> String {
    within(async {
        loop {
            let (status, _, body) = h.https("GET", "/healthz", &[], "").await;
            if status == want {
                return body;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await
}

#[tokio::test]
async fn losing_redis_is_reported_sends_are_refused_and_both_recover_when_it_returns() {
    let mut c = Cluster::on(RedisServer::start_durable().expect("redis-server starts")).await;
    let credential = c.a.issue("phone-1", &[]).await;
    let mut phone = c.b.connect(&credential, 0).await.expect("connects to node B");
    let body = health_becomes(&c.a, 200).await;
    assert!(body.contains("\"redis_up\":true"), "{body}");
    c.redis.kill();
    let body = health_becomes(&c.a, 503).await;
    assert!(body.contains("\"status\":\"degraded\""), "{body}");
    let refused =
        c.a.sender()
            .send_message(push_proto::sender::SendMessageRequest {
                target: Some(to("phone-1")),
                body: "during the outage".into(),
                ..Default::default()
            })
            .await
            .expect_err("a send nobody can route is refused, not lost");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    c.redis
        .restart(true)
        .expect("redis-server restarts with its data");
    health_becomes(&c.a, 200).await;
    // The phone's session on node B lived through the outage; routing works again.
    let sent = c.a.send("phone-1", "after the outage").await;
    let p = next(&mut phone).await;
    assert_eq!(p.id, sent.message_id);
    phone.ack(&[p.seq]).await.unwrap();
    c.a.await_state(&sent.message_id, "phone-1", DeliveryState::Acked)
        .await;
}

#[tokio::test]
async fn redis_restarted_empty_is_detected_and_the_phones_it_held_resync_without_losing_a_push() {
    let mut c = Cluster::on(RedisServer::start_durable().expect("redis-server starts")).await;
    let credential = c.a.issue("phone-1", &[]).await;
    let mut phone = c.b.connect(&credential, 0).await.expect("connects to node B");
    let old_epoch = phone.server_hello.epoch;
    let sent = c.a.send("phone-1", "shown, not yet acknowledged").await;
    let p = next(&mut phone).await;
    assert_eq!(p.id, sent.message_id);
    c.redis.restart(false).expect("redis-server restarts empty");
    // Node B notices within a heartbeat, writes back what it holds, and asks the phone to resync.
    match within(phone.next_push()).await {
        Err(ClientError::Goodbye { reason, .. }) => assert_eq!(reason, GoodbyeReason::Reconnect),
        other => panic!("the phone must be told to reconnect: {other:?}"),
    }
    // Both nodes notice within a heartbeat (and report it).
    for node in [&c.a, &c.b] {
        within(async {
            while health_becomes(node, 200)
                .await
                .contains("\"redis_data_lost_ms\":0")
            {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
        .await;
    }
    // Back with its floor from the old epoch: on a new epoch it acknowledges nothing, so the
    // push it had not acknowledged comes again (same id: the SDK shows it once).
    c.a.epoch.store(old_epoch, std::sync::atomic::Ordering::SeqCst);
    let mut phone =
        c.a.connect(&credential, p.seq)
            .await
            .expect("the device survived in Redis");
    assert_ne!(phone.server_hello.epoch, old_epoch, "a new epoch after the loss");
    let again = next(&mut phone).await;
    assert_eq!(again.id, sent.message_id);
    assert!(again.seq > p.seq, "renumbered above the old floor");
    phone.ack(&[again.seq]).await.unwrap();
    // (API keys went with Redis's data: senders are back once they are restored from a backup.)
}
