//! The FFI surface through the generated Python binding: generate the module from the built
//! library (library mode), start a real push-server with pushes queued for the device, run
//! `tests/python/test_ffi.py`, and fail if Python fails.

mod common;

use std::{path::Path, process::Stdio, time::Duration};

use push_proto::sender::{
    DeliveryState, GetMessageStatusRequest, PlaceCallRequest, SendMessageRequest, Target, target,
};
use testkit::harness::Harness;

const DEVICE: &str = "py-dev";
const MESSAGES: [&str; 3] = ["py-1", "py-2", "py-3"];
const CALL: &str = "py-call";

/// Generate the Python module next to a copy of the library, in `out`.
fn generate_binding(out: &Path) {
    let library = common::generate_binding(out, "python");
    std::fs::copy(&library, out.join(common::library_file())).unwrap();
    assert!(out.join("mobile_sdk_ffi.py").exists());
}

fn to_device() -> Option<Target> {
    Some(Target {
        kind: Some(target::Kind::DeviceId(DEVICE.into())),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_drives_the_ffi_against_a_real_server() {
    let out = tempfile::tempdir().unwrap();
    generate_binding(out.path());

    // The Python suite starts and stops one device's client 25 times in a row: far above a
    // phone's login rate, which is not what it tests.
    let mut server = Harness::start_with(|cfg| {
        cfg.limits.device_logins_per_minute = 6_000;
        cfg.limits.device_login_burst = 1_000;
    })
    .await;
    let (api, ca_pem) = (&server.api, server.ca.clone());
    let credential = server.issue(DEVICE, &[]).await;
    // Queued before the device connects: the Python side receives them as replay.
    for id in MESSAGES {
        api.sender()
            .send_message(SendMessageRequest {
                target: to_device(),
                title: format!("title {id}"),
                message_id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    api.sender()
        .place_call(PlaceCallRequest {
            call_id: CALL.into(),
            target: to_device(),
            caller_name: "Ward 4B".into(),
            ring_timeout_seconds: 120,
            escalation: Vec::new(),
            ..Default::default()
        })
        .await
        .unwrap();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/test_ffi.py");
    let run = tokio::process::Command::new("python3")
        .arg(&script)
        .env("PYTHONPATH", out.path())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("SDK_HOST", "127.0.0.1")
        .env("SDK_PORT", server.info.device_addr.port().to_string())
        .env("SDK_CA_PEM", &ca_pem)
        .env("SDK_DEVICE_ID", DEVICE)
        .env("SDK_CREDENTIAL", &credential)
        .env("SDK_MESSAGES", MESSAGES.join(","))
        .env("SDK_CALL_ID", CALL)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the Python test did not finish in 180 s")
        .expect("python3 runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{}{stderr}", String::from_utf8_lossy(&output.stdout));
    assert!(
        output.status.success(),
        "the Python FFI test failed: {}",
        output.status
    );
    assert!(stderr.contains("OK"), "unittest did not report OK");

    // The acks the Python-hosted client sent reached the server.
    for id in MESSAGES {
        let status = api
            .sender()
            .get_message_status(GetMessageStatusRequest {
                message_id: id.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status.recipients[0].state, DeliveryState::Acked as i32, "{id}");
    }
    server.shutdown().await;
}
