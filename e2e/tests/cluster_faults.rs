//! Cluster journeys across real processes: a durable `redis-server`, two `push-server` nodes in
//! cluster mode, a TCP balancer in front of them (the site's DNS or virtual IP), and phones that
//! are real `mobile_sdk` clients. Each journey prints what it did and measured; messages lost
//! or shown twice to an app must be 0.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use e2e::{
    ServerProcess,
    balancer::Balancer,
    phones::{Apps, broadcast, delivered_all, issue_group, phones, tally, until},
};
use mobile_sdk::Registry;
use push_proto::device::GoodbyeReason;
use push_server::client::ClientError;
use testkit::redis::{RedisServer, copy_dir};

/// Redis, two nodes sharing it, their data in a temporary directory.
struct Nodes {
    redis: RedisServer,
    a: ServerProcess,
    b: ServerProcess,
    _dir: tempfile::TempDir,
}

impl Nodes {
    fn start() -> Self {
        let redis = RedisServer::start_durable().expect("redis-server starts");
        Self::on(redis, None)
    }

    /// Node A reaches Redis at `a_redis` if given (a relay the test can cut), node B directly.
    fn on(redis: RedisServer, a_redis: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let args = |url: &str, node: &str| -> Vec<String> {
            vec![
                "--redis-url".into(),
                url.into(),
                "--node-name".into(),
                node.into(),
            ]
        };
        let a_args = args(a_redis.unwrap_or(&redis.url), "node-a");
        let a = ServerProcess::start(
            &dir.path().join("a"),
            &a_args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        // Every node needs the same CA, device-credential key and admin key.
        copy_dir(a.data_dir(), &dir.path().join("b")).unwrap();
        let b_args = args(&redis.url, "node-b");
        let b = ServerProcess::start(
            &dir.path().join("b"),
            &b_args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        Self {
            redis,
            a,
            b,
            _dir: dir,
        }
    }

    async fn issue_all(&self, n: usize) -> Vec<(String, String)> {
        issue_group(&self.b, n, "all").await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_node_during_traffic_moves_its_phones_and_loses_or_repeats_nothing() {
    const PHONES: usize = 400;
    const ROUNDS: usize = 10;
    let mut nodes = Nodes::start();
    let creds = nodes.issue_all(PHONES).await;
    let balancer = Balancer::start(vec![nodes.a.device_addr, nodes.b.device_addr])
        .await
        .unwrap();
    let apps = Arc::new(Apps::default());
    let registry = Registry::new(tokio::runtime::Handle::current());
    let _clients = phones(&registry, &apps, &creds, balancer.addr, &nodes.a.ca_pem()).await;
    let mut ids = Vec::new();
    let mut killed_at = None;
    for round in 0..ROUNDS {
        let id = format!("round-{round}");
        broadcast(&nodes.b, &id).await;
        ids.push(id);
        if round == 3 {
            // Node A holds every phone (the balancer prefers it): kill it mid-traffic.
            nodes.a.kill();
            killed_at = Some(Instant::now());
        }
    }
    let killed_at = killed_at.unwrap();
    until(
        "every phone back online on node B",
        Duration::from_secs(90),
        || {
            apps.online.load(Ordering::Acquire) == PHONES
                && apps.connected_at.lock().values().all(|t| *t > killed_at)
        },
    )
    .await;
    let back: Vec<Duration> = apps
        .connected_at
        .lock()
        .values()
        .map(|t| t.duration_since(killed_at))
        .collect();
    let (first_back, all_back) = (back.iter().min().copied(), back.iter().max().copied());
    until("every message shown", Duration::from_secs(60), || {
        delivered_all(&apps, &ids, &creds)
    })
    .await;
    let (lost, duplicated) = tally(&apps, &ids, &creds);
    println!(
        "kill -9 of node A with {PHONES} phones on it, {ROUNDS} group messages sent on node B \
         ({} deliveries): first phone back after {first_back:?}, all back after {all_back:?}, \
         lost {lost}, shown twice {duplicated}",
        PHONES * ROUNDS,
    );
    assert_eq!((lost, duplicated), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_during_traffic_loses_and_repeats_nothing() {
    const PHONES: usize = 100;
    const ROUNDS: usize = 8;
    let mut nodes = Nodes::start();
    let creds = nodes.issue_all(PHONES).await;
    let apps = Arc::new(Apps::default());
    let registry = Registry::new(tokio::runtime::Handle::current());
    // Half the phones on each node.
    let (on_a, on_b) = creds.split_at(PHONES / 2);
    let ca = nodes.a.ca_pem();
    let mut clients = phones(&registry, &apps, on_a, nodes.a.device_addr, &ca).await;
    clients.extend(phones(&registry, &apps, on_b, nodes.b.device_addr, &ca).await);
    let mut ids = Vec::new();
    let mut outage = Duration::ZERO;
    for round in 0..ROUNDS {
        let id = format!("round-{round}");
        broadcast(&nodes.a, &id).await;
        ids.push(id);
        if round == 3 {
            let down = Instant::now();
            nodes.redis.kill();
            tokio::time::sleep(Duration::from_millis(500)).await;
            nodes
                .redis
                .restart(true)
                .expect("redis-server restarts with its data");
            outage = down.elapsed();
        }
    }
    let started = Instant::now();
    while !delivered_all(&apps, &ids, &creds) && started.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waited = started.elapsed();
    let (lost, duplicated) = tally(&apps, &ids, &creds);
    if lost > 0 {
        let shown = apps.shown.lock();
        for id in &ids {
            let missing: Vec<&String> = creds
                .iter()
                .map(|(p, _)| p)
                .filter(|p| shown.get(id).is_none_or(|m| !m.contains_key(*p)))
                .collect();
            if !missing.is_empty() {
                eprintln!("{id}: not shown on {missing:?}");
            }
        }
        for (name, node) in [("A", &nodes.a), ("B", &nodes.b)] {
            for line in node
                .log()
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            {
                eprintln!("node {name}: {line}");
            }
        }
    }
    println!(
        "redis kill -9 and restart ({outage:?} down) with {PHONES} phones on two nodes, {ROUNDS} \
         group messages: all shown {waited:?} after the last send, lost {lost}, shown twice {duplicated}"
    );
    assert_eq!((lost, duplicated), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_redis_keeps_its_phones_and_catches_up_when_the_link_returns() {
    const PHONES: usize = 50;
    let redis = RedisServer::start_durable().expect("redis-server starts");
    let port = redis.port;
    let link = Balancer::start(vec![std::net::SocketAddr::from(([127, 0, 0, 1], port))])
        .await
        .unwrap();
    let url = format!("redis://{}/0", link.addr);
    let nodes = Nodes::on(redis, Some(&url));
    let creds = nodes.issue_all(PHONES).await;
    let apps = Arc::new(Apps::default());
    let registry = Registry::new(tokio::runtime::Handle::current());
    let _clients = phones(&registry, &apps, &creds, nodes.a.device_addr, &nodes.a.ca_pem()).await;
    link.cut();
    let cut_at = Instant::now();
    // Node B still reaches Redis: it takes the messages into the phones' inboxes.
    let ids: Vec<String> = (0..3).map(|r| format!("while-cut-{r}")).collect();
    for id in &ids {
        broadcast(&nodes.b, id).await;
    }
    let online_during_cut = apps.online.load(Ordering::Acquire);
    tokio::time::sleep(Duration::from_secs(2)).await;
    link.heal();
    let caught_up = until(
        "every message shown after the link returns",
        Duration::from_secs(60),
        || delivered_all(&apps, &ids, &creds),
    )
    .await;
    let (lost, duplicated) = tally(&apps, &ids, &creds);
    println!(
        "node A cut off from Redis for {:?} with {PHONES} phones: {online_during_cut} stayed online, \
         all messages shown {caught_up:?} after the link returned, lost {lost}, shown twice {duplicated}",
        cut_at.elapsed() - caught_up
    );
    assert_eq!(
        online_during_cut, PHONES,
        "the phones' sessions do not depend on Redis"
    );
    assert_eq!((lost, duplicated), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_logins_of_one_device_on_two_nodes_at_once_leave_one_session() {
    let nodes = Nodes::start();
    let credential = nodes.a.issue("phone-1").await;
    let (first, second) = tokio::join!(nodes.a.connect(&credential, 0), nodes.b.connect(&credential, 0));
    let (mut on_a, mut on_b) = (first.expect("login on A"), second.expect("login on B"));
    let sent = nodes.a.send_text("phone-1", "m1", "who has it?").await;
    // Exactly one session survives; the other is told it was replaced.
    let (a, b) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(10), on_a.next_push()),
        tokio::time::timeout(Duration::from_secs(10), on_b.next_push())
    );
    let outcome = |r: Result<Result<push_proto::device::Push, ClientError>, _>| match r {
        Ok(Ok(p)) => Ok(p.id),
        Ok(Err(ClientError::Goodbye { reason, .. })) => Err(reason),
        other => panic!("neither a push nor a goodbye: {other:?}"),
    };
    let (a, b) = (outcome(a), outcome(b));
    println!("two logins at once: node A {a:?}, node B {b:?}");
    match (a, b) {
        (Ok(id), Err(GoodbyeReason::Replaced)) | (Err(GoodbyeReason::Replaced), Ok(id)) => {
            assert_eq!(id, sent.message_id)
        }
        other => panic!("exactly one session must survive: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_of_two_thousand_phones_across_two_nodes_loses_nothing() {
    const PHONES: usize = 2_000;
    let mut nodes = Nodes::start();
    let creds = nodes.issue_all(PHONES).await;
    // Half the phones prefer node A, half node B (two names for the site, or a VIP per half).
    let to_a = Balancer::start(vec![nodes.a.device_addr, nodes.b.device_addr])
        .await
        .unwrap();
    let to_b = Balancer::start(vec![nodes.b.device_addr, nodes.a.device_addr])
        .await
        .unwrap();
    let apps = Arc::new(Apps::default());
    let registry = Registry::new(tokio::runtime::Handle::current());
    let ca = nodes.a.ca_pem();
    let (on_a, on_b) = creds.split_at(PHONES / 2);
    let started = Instant::now();
    let mut clients = phones(&registry, &apps, on_a, to_a.addr, &ca).await;
    clients.extend(phones(&registry, &apps, on_b, to_b.addr, &ca).await);
    let connected = started.elapsed();
    let before = "before-the-storm".to_string();
    broadcast(&nodes.b, &before).await;
    // Node A dies: its thousand phones storm onto node B at once.
    nodes.a.kill();
    let killed_at = Instant::now();
    let after = "during-the-storm".to_string();
    broadcast(&nodes.b, &after).await;
    until("every phone back online", Duration::from_secs(120), || {
        apps.online.load(Ordering::Acquire) == PHONES
            && on_a
                .iter()
                .all(|(id, _)| apps.connected_at.lock().get(id).is_some_and(|t| *t > killed_at))
    })
    .await;
    let storm = killed_at.elapsed();
    let ids = vec![before, after];
    until("every message shown", Duration::from_secs(60), || {
        delivered_all(&apps, &ids, &creds)
    })
    .await;
    let (lost, duplicated) = tally(&apps, &ids, &creds);
    println!(
        "{PHONES} phones on two nodes online in {connected:?}; kill -9 of node A: its {} phones \
         back on node B within {storm:?}; 2 group messages ({} deliveries): lost {lost}, shown \
         twice {duplicated}",
        PHONES / 2,
        2 * PHONES
    );
    assert_eq!((lost, duplicated), (0, 0));
}
