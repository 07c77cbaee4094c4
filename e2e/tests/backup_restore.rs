//! `push-server backup` of a running server under traffic, more traffic, `kill -9`, `push-server
//! restore`, restart: phones that are real SDK clients resume, every accepted message reaches
//! every app exactly once (the sender re-sends, with the same ids, what it had not seen
//! acknowledged), no receipt says ACKED for a push an app was not shown, and the restored
//! store has a new epoch.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use e2e::{
    ServerProcess,
    balancer::Balancer,
    phones::{Apps, broadcast_on, issue_group, phones, tally, until},
    server_command, within,
};
use mobile_sdk::Registry;
use push_proto::sender::{DeliveryState, GetMessageStatusRequest};
use push_server::api_client::SenderClient;

const PHONES: usize = 3;
/// Messages sent before the backup starts, while it runs and after it, before the kill. The
/// SDK drops a re-delivered push by id among the last 512 it saw, so what was pending at the
/// backup must be re-delivered within that many: a backup is restored with less traffic since.
const BEFORE: usize = 60;
/// Sent while the phones are connected; the rest are sent while they are cut off, so they are
/// accepted but not delivered when the server is killed.
const ONLINE: usize = 150;
const TOTAL: usize = 180;

/// Run the CLI; its exit status and its output (stdout and stderr).
fn cli(args: &[&str]) -> (bool, String) {
    let out = server_command().args(args).output().expect("run push-server");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `push-server restore --from backup --data-dir data`.
fn restore(backup: &Path, data: &Path) -> (bool, String) {
    let arg = |p: &Path| p.to_str().unwrap().to_string();
    cli(&["restore", "--from", &arg(backup), "--data-dir", &arg(data)])
}

/// The ids whose every recipient is ACKED, and for each id the recipients that are.
async fn acked(sender: &mut SenderClient, ids: &[String]) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for id in ids {
        let status = sender
            .get_message_status(GetMessageStatusRequest {
                message_id: id.clone(),
            })
            .await;
        let Ok(status) = status else { continue };
        let devices = status
            .into_inner()
            .recipients
            .into_iter()
            .filter(|r| r.state() == DeliveryState::Acked)
            .map(|r| r.device_id)
            .collect();
        out.push((id.clone(), devices));
    }
    out
}

async fn epoch_seen_by(server: &ServerProcess, credential: &str) -> u64 {
    let probe = server.connect(credential, 0).await.expect("probe connects");
    let epoch = probe.server_hello.epoch;
    within("probe close", probe.close()).await.unwrap();
    epoch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_under_traffic_kill_restore_delivers_every_message_once_and_acks_only_what_was_shown() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut server = ServerProcess::start(&data, &[]);
    let creds = issue_group(&server, PHONES, "all").await;
    let probe = server.issue("probe").await;
    let epoch_before = epoch_seen_by(&server, &probe).await;
    let balancer = Balancer::start(vec![server.device_addr]).await.unwrap();
    let apps = Arc::new(Apps::default());
    let registry = Registry::new(tokio::runtime::Handle::current());
    let _clients = phones(&registry, &apps, &creds, balancer.addr, &server.ca_pem()).await;

    // Traffic from a sender task; the backup is taken while it runs.
    let ids: Vec<String> = (0..TOTAL).map(|i| format!("m-{i:03}")).collect();
    let (sent_tx, mut sent_rx) = tokio::sync::watch::channel(0usize);
    let traffic = {
        let (mut sender, ids) = (server.api().await.sender(), ids[..ONLINE].to_vec());
        tokio::spawn(async move {
            for (n, id) in ids.iter().enumerate() {
                broadcast_on(&mut sender, id).await;
                let _ = sent_tx.send(n + 1);
            }
        })
    };
    within("traffic before the backup", sent_rx.wait_for(|n| *n >= BEFORE))
        .await
        .unwrap();
    let backup = tmp.path().join("site.lpbak");
    let started = Instant::now();
    let (ok, out) = {
        let (api, dir, file) = (server.api_addr.to_string(), data.clone(), backup.clone());
        tokio::task::spawn_blocking(move || {
            let dir = dir.to_str().unwrap().to_string();
            cli(&[
                "backup",
                "--api",
                &api,
                "--data-dir",
                &dir,
                "--out",
                file.to_str().unwrap(),
            ])
        })
        .await
        .unwrap()
    };
    let took = started.elapsed();
    assert!(ok, "backup failed: {out}");
    let sent_at_backup = *sent_rx.borrow();
    let mode = std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the backup holds the keys: owner-only");

    // A running server's data directory is not restored over.
    let (ok, out) = restore(&backup, &data);
    assert!(
        !ok && out.contains("running push-server"),
        "restore over a running server: {out}"
    );
    assert!(data.join("push.redb").exists());

    within("the rest of the traffic", traffic).await.unwrap();
    balancer.cut();
    let mut sender = server.api().await.sender();
    for id in &ids[ONLINE..] {
        broadcast_on(&mut sender, id).await;
    }
    let acked_live: Vec<String> = acked(&mut sender, &ids)
        .await
        .into_iter()
        .filter(|(_, devices)| devices.len() == PHONES)
        .map(|(id, _)| id)
        .collect();

    // The machine dies; the site restores the backup and starts the server again.
    server.kill();
    let (ok, out) = restore(&backup, &data);
    assert!(ok, "restore failed: {out}");
    let aside = only_sibling_named(tmp.path(), "data.before-restore-");
    assert!(
        aside.join("push.redb").exists(),
        "the replaced data directory is kept"
    );
    server.restart();
    balancer.retarget(vec![server.device_addr]);
    let epoch_after = epoch_seen_by(&server, &probe).await;
    assert_ne!(
        epoch_after, epoch_before,
        "a restored store must have a new epoch"
    );

    // The sender re-sends, with the same ids, every message it had not seen acknowledged.
    let mut sender = server.api().await.sender();
    let resent: Vec<&String> = ids.iter().filter(|id| !acked_live.contains(id)).collect();
    assert!(resent.len() >= TOTAL - ONLINE, "{} re-sent", resent.len());
    for id in &resent {
        broadcast_on(&mut sender, id).await;
    }
    balancer.heal();
    let waited = Instant::now();
    until("every message shown", Duration::from_secs(60), || {
        tally(&apps, &ids, &creds).0 == 0
    })
    .await;
    let (lost, duplicated) = tally(&apps, &ids, &creds);

    // Every ACKED receipt of the restored server is a push its app was shown.
    let shown = apps.shown.lock().clone();
    let mut acked_receipts = 0;
    for (id, devices) in acked(&mut sender, &ids).await {
        for device in devices {
            acked_receipts += 1;
            assert!(
                shown.get(&id).is_some_and(|m| m.contains_key(&device)),
                "{id} is ACKED for {device}, whose app was never shown it"
            );
        }
    }
    println!(
        "backup of a server under traffic in {took:?} ({sent_at_backup} of {TOTAL} messages sent \
         when it finished), kill -9, restore, restart: {} re-sent by the sender, all shown {:?} \
         after the phones were let back; lost {lost}, shown twice {duplicated}, ACKED receipts on \
         the restored server {acked_receipts} (all shown)",
        resent.len(),
        waited.elapsed(),
    );
    assert_eq!((lost, duplicated), (0, 0));
}

/// The one entry of `dir` whose name starts with `prefix`.
fn only_sibling_named(dir: &Path, prefix: &str) -> std::path::PathBuf {
    let found: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found.into_iter().next().unwrap()
}
