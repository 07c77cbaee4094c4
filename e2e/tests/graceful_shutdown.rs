//! SIGTERM: connected devices are told SERVER_SHUTDOWN, the process exits 0, and queued
//! messages survive into the next start.

use e2e::{ClientError, ServerProcess, within};
use push_proto::device::GoodbyeReason;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_says_goodbye_exits_zero_and_keeps_the_queue() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(&tmp.path().join("data"), &[]);
    let online_cred = server.issue("online-phone").await;
    let offline_cred = server.issue("offline-phone").await;

    let mut online = server
        .connect(&online_cred, 0)
        .await
        .expect("online device connects");
    // Prove the session is live before the signal: a push goes through.
    server.send_text("online-phone", "before-shutdown", "hello").await;
    let p = within("push before shutdown", online.next_push()).await.unwrap();
    assert_eq!(p.id, "before-shutdown");
    within("ack", online.ack(&[p.seq])).await.unwrap();
    server.wait_durably_acked("before-shutdown").await;

    server.send_text("offline-phone", "queued-1", "one").await;
    server.send_text("offline-phone", "queued-2", "two").await;

    // The goodbye is read concurrently with the shutdown.
    let goodbye = tokio::spawn(async move { online.next_push().await });
    let status = tokio::task::spawn_blocking(move || {
        let status = server.terminate();
        (server, status)
    });
    let (mut server, status) = within("graceful shutdown", status).await.unwrap();
    assert!(
        status.success(),
        "SIGTERM must end in exit code 0, got {status:?}; log:\n{}",
        server.log()
    );
    match within("goodbye", goodbye).await.unwrap() {
        Err(ClientError::Goodbye { reason, .. }) => assert_eq!(reason, GoodbyeReason::ServerShutdown),
        other => panic!("expected Goodbye SERVER_SHUTDOWN, got {other:?}"),
    }
    let log = server.log();
    assert!(log.contains("shutdown requested"), "log:\n{log}");
    assert!(log.contains("push-server stopped"), "log:\n{log}");

    // Next start: both queued messages are still there, in order.
    server.restart();
    let mut offline = server
        .connect(&offline_cred, 0)
        .await
        .expect("offline device connects");
    assert_eq!(offline.server_hello.replay_count, 2);
    let a = within("replay 1", offline.next_push()).await.unwrap();
    let b = within("replay 2", offline.next_push()).await.unwrap();
    assert_eq!((a.id.as_str(), b.id.as_str()), ("queued-1", "queued-2"));
    assert!(b.seq > a.seq);
    within("ack", offline.ack(&[a.seq, b.seq])).await.unwrap();
    server.wait_durably_acked("queued-2").await;

    // The online device's acknowledged push is not replayed after the graceful restart.
    let online = server
        .connect(&online_cred, 0)
        .await
        .expect("online device reconnects");
    assert_eq!(
        online.server_hello.replay_count, 0,
        "acked push survived a graceful restart"
    );
}

// Regression tests for two shutdown bugs found by this suite.

/// A supervisor may stop the server the moment it reports ready: that must already be a
/// graceful shutdown (the handler is installed before the ready line), not death by signal 15.
#[test]
fn sigterm_right_after_ready_is_graceful() {
    let tmp = tempfile::tempdir().unwrap();
    for round in 0..20 {
        let mut server = ServerProcess::start(&tmp.path().join(format!("data-{round}")), &[]);
        let status = server.terminate();
        assert!(
            status.success(),
            "round {round}: SIGTERM right after the ready line ended in {status:?}; log:\n{}",
            server.log()
        );
    }
}

/// Write-behind state (the sessions' end, late acks) is submitted before the store closes, so a
/// graceful shutdown loses none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_flushes_write_behind_state() {
    use push_proto::sender::ListDevicesRequest;
    let tmp = tempfile::tempdir().unwrap();
    for round in 0..20 {
        let mut server = ServerProcess::start(&tmp.path().join(format!("data-{round}")), &[]);
        let cred = server.issue("phone").await;
        let mut device = server.connect(&cred, 0).await.expect("connect");
        server.send_text("phone", "m", "x").await;
        let p = within("push", device.next_push()).await.unwrap();
        // SIGTERM right behind the ack, so write-behind writes are in flight at shutdown.
        within("ack", device.ack(&[p.seq])).await.unwrap();
        let (mut server, status) = tokio::task::spawn_blocking(move || {
            let status = server.terminate();
            (server, status)
        })
        .await
        .unwrap();
        assert!(status.success());
        let log = server.log();
        assert!(
            !log.contains("store write failed"),
            "round {round}: a write was lost during graceful shutdown:\n{log}"
        );
        server.restart();
        let devices = within(
            "ListDevices",
            server
                .api()
                .await
                .sender()
                .list_devices(ListDevicesRequest::default()),
        )
        .await
        .unwrap()
        .into_inner()
        .devices;
        assert!(
            devices[0].last_disconnect_reason.contains("SERVER_SHUTDOWN"),
            "round {round}: session end not persisted by the graceful shutdown: {:?}",
            devices[0]
        );
    }
}
