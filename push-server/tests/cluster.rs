//! Cluster mode: two in-process nodes over real TLS sharing one real `redis-server`. Phones and
//! senders use whichever node they like; what one does, the other sees.

use push_proto::{
    device::{CallOutcome, CallOutcomeResult, CancelReason, GoodbyeReason, push},
    sender::{
        CallState, CancelCallRequest, DeliveryState, GetMessageStatusRequest, PlaceCallRequest,
        WatchCallRequest,
    },
};
use push_server::{client::ClientError, config::Config, server::Server};
use testkit::harness::{Harness, call_to, next, to, to_devices, within};
use testkit::redis::{RedisServer, TestCerts, copy_dir};

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
        let url = redis.url.clone();
        let (a, b) = nodes(|c| c.cluster.redis_url = url.clone()).await;
        Self { a, b, redis }
    }
}

/// Nodes A and B, each with `cluster` applied to its configuration.
async fn nodes(cluster: impl Fn(&mut Config)) -> (Harness, Harness) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let a = Harness::start_with(|c| {
        cluster(c);
        c.node_name = "node-a".into();
    })
    .await;
    let from = a.cfg.data_dir.clone();
    let b = Harness::start_with(|c| {
        cluster(c);
        c.node_name = "node-b".into();
        copy_dir(&from, &c.data_dir).expect("copy node A's data directory");
    })
    .await;
    (a, b)
}

/// A message sent on node A reaches the phone on node B, and A sees it acknowledged.
async fn relayed(a: &Harness, phone: &mut push_server::client::DeviceClient, body: &str) {
    let sent = a.send("phone-1", body).await;
    assert_eq!(sent.recipients[0].state(), DeliveryState::Accepted);
    let p = next(phone).await;
    assert_eq!(p.id, sent.message_id);
    phone.ack(&[p.seq]).await.unwrap();
    a.await_state(&sent.message_id, "phone-1", DeliveryState::Acked)
        .await;
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
    c.a.place(call_to("call-1", "phone-1", "Ward 4B")).await.unwrap();
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

#[tokio::test]
async fn two_phones_on_two_nodes_answering_at_once_one_wins_and_the_other_is_stopped() {
    let c = Cluster::start().await;
    let (on_a, on_b) = (c.a.issue("on-a", &[]).await, c.a.issue("on-b", &[]).await);
    let mut phone_a = c.a.connect(&on_a, 0).await.expect("connects to node A");
    let mut phone_b = c.b.connect(&on_b, 0).await.expect("connects to node B");
    for round in 0..5 {
        let call_id = format!("ward-{round}");
        c.a.place(PlaceCallRequest {
            call_id: call_id.clone(),
            target: Some(to_devices(&["on-a", "on-b"])),
            caller_name: "Ward 4B".into(),
            ring_timeout_seconds: 30,
            ..Default::default()
        })
        .await
        .unwrap();
        for phone in [&mut phone_a, &mut phone_b] {
            let invite = next(phone).await;
            assert!(
                matches!(invite.body, Some(push::Body::CallInvite(_))),
                "{invite:?}"
            );
            phone.ack(&[invite.seq]).await.unwrap();
        }
        // Both users answer at once, each on the node its phone holds a session with.
        let (ra, rb) = tokio::join!(
            phone_a.report_call(&call_id, CallOutcome::Answered),
            phone_b.report_call(&call_id, CallOutcome::Answered)
        );
        let (ra, rb) = (ra.unwrap().result(), rb.unwrap().result());
        let (winner, loser) = match (ra, rb) {
            (CallOutcomeResult::Recorded, CallOutcomeResult::AnsweredElsewhere) => ("on-a", &mut phone_b),
            (CallOutcomeResult::AnsweredElsewhere, CallOutcomeResult::Recorded) => ("on-b", &mut phone_a),
            other => panic!("{call_id}: exactly one answer wins, got {other:?}"),
        };
        let cancel = next(loser).await;
        let Some(push::Body::CallCancel(stop)) = &cancel.body else {
            panic!("the loser is told to stop: {cancel:?}")
        };
        assert_eq!(stop.reason(), CancelReason::AnsweredElsewhere);
        loser.ack(&[cancel.seq]).await.unwrap();
        // Either node gives the same picture.
        for node in [&c.a, &c.b] {
            let s = node
                .sender()
                .get_call_status(WatchCallRequest {
                    call_id: call_id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!((s.state(), s.answered_by.as_str()), (CallState::Answered, winner));
        }
        c.b.await_state(&call_id, winner, DeliveryState::Answered).await;
    }
}

#[tokio::test]
async fn a_call_whose_node_is_gone_still_escalates_and_ends_missed_on_the_other_node() {
    let mut c = Cluster::start().await;
    let (nurse, charge) = (c.a.issue("nurse", &[]).await, c.a.issue("charge", &[]).await);
    let mut nurse = c.b.connect(&nurse, 0).await.expect("connects to node B");
    let mut charge = c.b.connect(&charge, 0).await.expect("connects to node B");
    c.a.place(PlaceCallRequest {
        call_id: "orphan".into(),
        target: Some(to("nurse")),
        caller_name: "Bed 7".into(),
        ring_timeout_seconds: 3,
        escalation: vec![push_proto::sender::EscalationStep {
            target: Some(to("charge")),
            after_seconds: 1,
            stop_earlier: false,
        }],
        ..Default::default()
    })
    .await
    .unwrap();
    let invite = next(&mut nurse).await;
    nurse.ack(&[invite.seq]).await.unwrap();
    // The node that placed the call, and kept its timer, is gone.
    c.a.shutdown().await;
    // Node B's sweep rings the step at its time and ends the call at its deadline.
    let invite = next(&mut charge).await;
    assert!(
        matches!(invite.body, Some(push::Body::CallInvite(_))),
        "{invite:?}"
    );
    charge.ack(&[invite.seq]).await.unwrap();
    for phone in [&mut nurse, &mut charge] {
        let p = next(phone).await;
        let Some(push::Body::CallCancel(stop)) = &p.body else {
            panic!("the missed call is told: {p:?}")
        };
        assert_eq!(stop.reason(), CancelReason::Missed);
    }
    let s =
        c.b.sender()
            .get_call_status(WatchCallRequest {
                call_id: "orphan".into(),
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(s.state(), CallState::Missed);
    assert!(
        s.steps[1].started_at_ms >= s.steps[1].due_at_ms,
        "never early: {s:?}"
    );
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
    // The phone's session on node B lived through the outage; routing works again. The first
    // request on a pooled connection Redis dropped can still be refused (UNAVAILABLE, nothing
    // queued): the sender retries it under the same id, as the API asks, and it goes through.
    let request = push_proto::sender::SendMessageRequest {
        target: Some(to("phone-1")),
        body: "after the outage".into(),
        message_id: "after-the-outage".into(),
        ..Default::default()
    };
    let mut tries = 0;
    let sent = loop {
        tries += 1;
        match c.a.sender().send_message(request.clone()).await {
            Ok(sent) => break sent.into_inner(),
            Err(refused) if refused.code() == tonic::Code::Unavailable && tries < 5 => {
                // The connection manager reconnects in the background after the failure.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("send after Redis returned, try {tries}: {e:?}"),
        }
    };
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

/// Two nodes on the Redis at `url` (a `rediss` URL), trusting `certs`' CA and presenting its
/// client certificate: a message crosses from node A to a phone on node B.
async fn relayed_over_tls(certs: &TestCerts, url: &str, body: &str) {
    let (a, b) = nodes(|c| {
        c.cluster.redis_url = url.to_string();
        c.cluster.redis_ca_file = Some(certs.ca.clone());
        c.cluster.redis_client_cert_file = Some(certs.client_cert.clone());
        c.cluster.redis_client_key_file = Some(certs.client_key.clone());
    })
    .await;
    let credential = a.issue("phone-1", &[]).await;
    let mut phone = b.connect(&credential, 0).await.expect("connects to node B");
    relayed(&a, &mut phone, body).await;
}

#[tokio::test]
async fn nodes_reach_redis_over_tls_trusting_a_private_ca_with_a_client_certificate() {
    let certs = TestCerts::generate("tls-relay").expect("certificates");
    let redis = RedisServer::start_tls(&certs).expect("redis-server starts with TLS");
    relayed_over_tls(&certs, &redis.url, "over TLS").await;
}

#[tokio::test]
async fn nodes_follow_a_sentinel_over_tls_to_a_master_over_tls() {
    let certs = TestCerts::generate("tls-sentinel").expect("certificates");
    let master = RedisServer::start_tls(&certs).expect("redis-server starts with TLS");
    let sentinel = RedisServer::start_sentinel_tls(&master, &certs).expect("sentinel starts with TLS");
    relayed_over_tls(&certs, &sentinel.url, "through a Sentinel, all over TLS").await;
}

#[tokio::test]
async fn a_node_that_cannot_verify_redis_or_read_its_ca_refuses_to_start_and_says_why() {
    let certs = TestCerts::generate("tls-server").expect("certificates");
    let other = TestCerts::generate("tls-other").expect("certificates");
    let redis = RedisServer::start_tls(&certs).expect("redis-server starts with TLS");
    let dir = tempfile::tempdir().unwrap();
    let start = |ca: std::path::PathBuf| {
        let mut cfg = loopback_config(dir.path());
        cfg.cluster.redis_url = redis.url.clone();
        cfg.cluster.redis_ca_file = Some(ca);
        cfg.cluster.redis_client_cert_file = Some(certs.client_cert.clone());
        cfg.cluster.redis_client_key_file = Some(certs.client_key.clone());
        async move {
            match within(Server::start(cfg)).await {
                Ok(_) => panic!("the node must not start"),
                Err(e) => format!("{e:#}"),
            }
        }
    };
    let error = start(other.ca.clone()).await;
    assert!(
        error.contains("cannot reach the cluster's Redis") && error.contains("invalid peer certificate"),
        "{error}"
    );
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    let error = start(not_pem).await;
    assert!(error.contains("holds no PEM certificate"), "{error}");
    let error = start(dir.path().join("missing.pem")).await;
    assert!(
        error.contains("cannot read") && error.contains("missing.pem"),
        "{error}"
    );
}

/// A node's config on loopback ports the system picks, its data in `dir`.
fn loopback_config(dir: &std::path::Path) -> Config {
    Config {
        data_dir: dir.join("data"),
        device_listen: "127.0.0.1:0".parse().unwrap(),
        api_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    }
}

/// Poll `check` every 50 ms until it holds, for at most 10 s.
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// One command to the server at `url`, over a fresh connection.
fn query<T: redis::FromRedisValue>(url: &str, args: &[&str]) -> redis::RedisResult<T> {
    let mut conn =
        redis::Client::open(url)?.get_connection_with_timeout(std::time::Duration::from_secs(1))?;
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query(&mut conn)
}

/// `/healthz` of `h` answers 200 with a heartbeat that reached Redis after `since_ms`.
async fn beats_after(h: &Harness, since_ms: i64) {
    within(async {
        loop {
            let (status, _, body) = h.https("GET", "/healthz", &[], "").await;
            let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if status == 200 && json["cluster"]["redis_last_ok_ms"].as_i64() > Some(since_ms) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await
}

#[tokio::test]
async fn after_a_sentinel_failover_both_nodes_follow_the_new_master_and_messages_flow() {
    let mut master = RedisServer::start().expect("master starts");
    let replica = RedisServer::start_replica_of(&master).expect("replica starts");
    until("the replica is in sync", || {
        query::<String>(&replica.url, &["INFO", "replication"])
            .is_ok_and(|i| i.contains("master_link_status:up"))
    })
    .await;
    let sentinel = RedisServer::start_sentinel(&master, None).expect("sentinel starts");
    let sentinel_plain = format!("redis://127.0.0.1:{}", sentinel.port);
    until("Sentinel knows the replica", || {
        query::<Vec<std::collections::HashMap<String, String>>>(
            &sentinel_plain,
            &["SENTINEL", "REPLICAS", "mymaster"],
        )
        .is_ok_and(|r| r.iter().any(|r| r.get("port") == Some(&replica.port.to_string())))
    })
    .await;
    let (a, b) = nodes(|c| c.cluster.redis_url = sentinel.url.clone()).await;
    let credential = a.issue("phone-1", &[]).await;
    let mut phone = b.connect(&credential, 0).await.expect("connects to node B");
    relayed(&a, &mut phone, "before the failover").await;

    // Replication is asynchronous: what the master acknowledged last may never reach the
    // replica (ARCHITECTURE.md, "Cluster mode", says what that costs). Here nothing is lost.
    let synced: i64 = query(&master.url, &["WAIT", "1", "5000"]).unwrap();
    assert_eq!(synced, 1);
    master.kill();
    until("Sentinel promotes the replica", || {
        query::<Vec<String>>(
            &sentinel_plain,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"],
        )
        .is_ok_and(|addr| addr.get(1) == Some(&replica.port.to_string()))
    })
    .await;
    let switched = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // Both nodes are back on the new master (their heartbeats reach it; the old one is dead)...
    beats_after(&a, switched).await;
    beats_after(&b, switched).await;
    // ...and the phone's session on node B lived through the failover.
    relayed(&a, &mut phone, "after the failover").await;
}

/// A Sentinel that requires a password is asked with the one in the URL's query; without it a
/// node refuses to start and says why, never quoting the password.
#[tokio::test]
async fn a_sentinel_with_a_password_is_asked_with_the_urls_sentinel_password() {
    let master = RedisServer::start().expect("master starts");
    let sentinel = RedisServer::start_sentinel(&master, Some("s3ntinel")).expect("sentinel starts");
    let (a, b) = nodes(|c| c.cluster.redis_url = sentinel.url.clone()).await;
    let credential = a.issue("phone-1", &[]).await;
    let mut phone = b.connect(&credential, 0).await.expect("connects to node B");
    relayed(&a, &mut phone, "through a guarded Sentinel").await;

    let dir = tempfile::tempdir().unwrap();
    let start = |url: String| {
        let mut cfg = loopback_config(dir.path());
        cfg.cluster.redis_url = url;
        async move {
            match within(Server::start(cfg)).await {
                Ok(_) => panic!("the node must not start"),
                Err(e) => format!("{e:#}"),
            }
        }
    };
    let bare = sentinel.url.split_once('?').unwrap().0.to_string();
    let error = start(bare).await;
    assert!(error.contains("cannot reach the cluster's Redis"), "{error}");
    let error = start(sentinel.url.replace("s3ntinel", "wrong-one")).await;
    assert!(error.contains("cannot reach the cluster's Redis"), "{error}");
    assert!(!error.contains("wrong-one"), "{error}");
}

/// A push forwarded through a device's inbox is announced ACCEPTED once, by the node the sender
/// used (its forward wrote the receipt), not again when the holder applies it.
#[tokio::test]
async fn a_forwarded_message_is_reported_accepted_once() {
    let c = Cluster::start().await;
    let credential = c.a.issue("phone-1", &[]).await;
    let sent = c.a.send("phone-1", "queued while the phone is away").await;
    let mut updates =
        c.a.sender()
            .watch_message(GetMessageStatusRequest {
                message_id: sent.message_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
    let first = within(updates.message()).await.unwrap().expect("current state");
    assert_eq!(first.state(), DeliveryState::Accepted);
    let mut phone = c.b.connect(&credential, 0).await.expect("connects to node B");
    let p = next(&mut phone).await;
    phone.ack(&[p.seq]).await.unwrap();
    let mut seen = vec![first.state()];
    while seen.last() != Some(&DeliveryState::Acked) {
        let u = within(updates.message()).await.unwrap().expect("an update");
        seen.push(u.state());
    }
    assert_eq!(
        seen,
        [
            DeliveryState::Accepted,
            DeliveryState::Delivered,
            DeliveryState::Acked
        ]
    );
}
