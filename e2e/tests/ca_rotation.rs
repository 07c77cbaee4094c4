//! CA rotation on a running server with phones that are real SDK clients, trusting what their
//! enrollment gave them (the CA of the day and the current + standby pins): after one rotation
//! every phone reconnects and gets its messages; after a second, a phone enrolled before the
//! first is refused, says why (enroll again), the server logs it, and once enrolled again it
//! is back.

use std::{sync::Arc, sync::atomic::Ordering, time::Duration};

use e2e::{
    ServerProcess,
    balancer::Balancer,
    phones::{Apps, broadcast_on, phone, until},
    server_command,
};
use mobile_sdk::{Registry, Trust};
use push_proto::sender::{EnrollDeviceRequest, ProviderConfiguration, RotateCaRequest};

/// Enroll `device` in the group `all` with the admin key: what its container app saves.
async fn enroll(server: &ServerProcess, device: &str) -> ProviderConfiguration {
    server
        .api()
        .await
        .admin()
        .enroll_device(EnrollDeviceRequest {
            device_id: device.into(),
            groups: vec!["all".into()],
            valid_days: 0,
        })
        .await
        .expect("EnrollDevice")
        .into_inner()
        .provider_configuration
        .expect("a provider configuration")
}

/// Start the SDK client of the phone enrolled as `pc`, trusting what its enrollment gave it,
/// and wait until `online` phones are online.
async fn start(
    registry: &Registry,
    apps: &Arc<Apps>,
    pc: &ProviderConfiguration,
    addr: std::net::SocketAddr,
    online: usize,
) -> mobile_sdk::Client {
    let trust = Trust {
        ca_pem: Some(pc.ca_certificate.clone()),
        pins: pc.pins.clone(),
    };
    let seed = online as u64;
    let client = phone(registry, apps, (&pc.device_id, &pc.credential), trust, addr, seed).await;
    until("the phone online", Duration::from_secs(20), || {
        apps.online.load(Ordering::Acquire) == online
    })
    .await;
    client
}

/// Whether every phone in `ids` was shown message `id`.
fn shown_on(apps: &Apps, id: &str, ids: &[&str]) -> bool {
    let shown = apps.shown.lock();
    ids.iter()
        .all(|p| shown.get(id).is_some_and(|m| m.get(*p) == Some(&1)))
}

/// Drop every phone's connection: each reconnects through a new handshake; `back` names the
/// wait for `expected` phones online again.
async fn reconnect_all(balancer: &Balancer, apps: &Apps, expected: usize, back: &str) {
    balancer.cut();
    until("every phone offline", Duration::from_secs(20), || {
        apps.online.load(Ordering::Acquire) == 0
    })
    .await;
    balancer.heal();
    until(back, Duration::from_secs(60), || {
        apps.online.load(Ordering::Acquire) == expected
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phones_enrolled_before_a_rotation_keep_connecting_and_two_rotations_behind_are_told_to_enroll_again()
{
    let tmp = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&tmp.path().join("data"), &[]);
    let balancer = Balancer::start(vec![server.device_addr]).await.unwrap();
    let apps = Arc::new(Apps::default());
    let registry = Registry::new(tokio::runtime::Handle::current());
    let mut sender = server.api().await.sender();

    // Generation 0: the early phone is enrolled.
    let early = enroll(&server, "early").await;
    assert_eq!(early.pins.len(), 2, "current and standby pins");
    let early_client = start(&registry, &apps, &early, balancer.addr, 1).await;

    // Rotation 1, through the CLI: the early phone's session stays up, and its reconnects
    // verify the new chain through the standby pin.
    let out = server_command()
        .args([
            "pki",
            "rotate-ca",
            "--api",
            &server.api_addr.to_string(),
            "--data-dir",
        ])
        .arg(server.data_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "rotate-ca: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("generation 1"), "{text}");
    assert!(
        text.contains(&early.pins[1]),
        "the standby key is the CA now: {text}"
    );
    assert_eq!(
        apps.online.load(Ordering::Acquire),
        1,
        "a rotation ends no session"
    );
    assert_ne!(server.ca_pem(), early.ca_certificate);
    reconnect_all(&balancer, &apps, 1, "phones back online").await;
    broadcast_on(&mut sender, "after-rotation-1").await;
    until("shown after rotation 1", Duration::from_secs(20), || {
        shown_on(&apps, "after-rotation-1", &["early"])
    })
    .await;

    // Generation 1: the late phone is enrolled with the new pins.
    let late = enroll(&server, "late").await;
    assert_eq!(late.pins[0], early.pins[1]);
    let _late_client = start(&registry, &apps, &late, balancer.addr, 2).await;

    // Rotation 2, through the API: the early phone pins neither key any more.
    let r = server
        .api()
        .await
        .admin()
        .rotate_ca(RotateCaRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.generation, 2);
    assert_eq!(r.ca_pin, late.pins[1]);
    apps.last_disconnect.lock().clear();
    reconnect_all(&balancer, &apps, 1, "late back online").await;
    until("early refused", Duration::from_secs(60), || {
        apps.last_disconnect
            .lock()
            .get("early")
            .is_some_and(|r| r.contains("enroll the device again"))
    })
    .await;
    let reason = apps.last_disconnect.lock().get("early").cloned().unwrap();
    println!("the early phone, two rotations behind: {reason}");
    broadcast_on(&mut sender, "after-rotation-2").await;
    until("shown after rotation 2", Duration::from_secs(20), || {
        shown_on(&apps, "after-rotation-2", &["late"])
    })
    .await;
    assert!(!shown_on(&apps, "after-rotation-2", &["early"]));

    // Enrolled again, the early phone is back and gets what was queued for it.
    drop(early_client);
    let again = enroll(&server, "early").await;
    assert_eq!(again.pins, [r.ca_pin.clone(), r.next_ca_pin.clone()]);
    let _again_client = start(&registry, &apps, &again, balancer.addr, 2).await;
    until(
        "the re-enrolled phone shows what it missed",
        Duration::from_secs(30),
        || shown_on(&apps, "after-rotation-2", &["early", "late"]),
    )
    .await;
}
