//! The README walkthrough through the real CLI: issue a credential to a file, connect as the
//! device in the background, send it a message, see it arrive, list the device.

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Output, Stdio},
    time::Duration,
};

use e2e::{LineReader, STEP_TIMEOUT, ServerProcess, server_command, wait_exit};
use push_proto::sender::{DeliveryState, GetMessageStatusRequest};

/// Run a CLI command to completion (bounded), asserting success.
fn cli(args: &[&str]) -> String {
    let mut child = server_command()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn push-server CLI");
    let status = wait_exit(&mut child, STEP_TIMEOUT);
    if status.is_none() {
        let _ = child.kill();
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    );
    assert!(
        status.success(),
        "push-server {args:?} failed ({status:?})\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    stdout
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_walkthrough_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = ServerProcess::start(&data, &[]);
    let api = server.api_addr.to_string();
    let addr = server.device_addr.to_string();
    let data_dir = path_str(&data);

    // 1. Issue a credential into a file readable only by its owner.
    let cred_file = tmp.path().join("phone-1.cred");
    let out = cli(&[
        "device",
        "issue",
        "phone-1",
        "--group",
        "ward:4B",
        "--out",
        path_str(&cred_file),
        "--api",
        &api,
        "--data-dir",
        data_dir,
    ]);
    assert!(out.contains("phone-1"), "{out}");
    let mode = std::fs::metadata(&cred_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "credential file mode {mode:o}");
    assert!(!std::fs::read_to_string(&cred_file).unwrap().trim().is_empty());

    // 2. Connect as the device in the background and wait until it is in.
    let credential_arg = format!("@{}", cred_file.display());
    let mut connect = server_command()
        .args([
            "device",
            "connect",
            "--credential",
            &credential_arg,
            "--count",
            "1",
        ])
        .args(["--addr", &addr, "--data-dir", data_dir])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn device connect");
    let connect_out = LineReader::spawn(connect.stdout.take().unwrap());
    let connect_err = LineReader::spawn(connect.stderr.take().unwrap());
    let hello = connect_out
        .wait_for("connected as", STEP_TIMEOUT)
        .unwrap_or_else(|e| {
            let _ = connect.kill();
            panic!("device connect: {e}; stderr: {:?}", connect_err.lines())
        });
    assert!(hello.contains("phone-1"), "{hello}");

    // 3. Send it a message.
    let out = cli(&[
        "send",
        "--device",
        "phone-1",
        "--body",
        "hi",
        "--api",
        &api,
        "--data-dir",
        data_dir,
    ]);
    let message_id = out
        .lines()
        .find_map(|l| l.strip_prefix("message "))
        .unwrap_or_else(|| panic!("send printed no message id:\n{out}"))
        .trim()
        .to_string();

    // 4. The device prints it, acknowledges it and exits 0 (it asked for one push).
    let line = connect_out
        .wait_for("push seq=", STEP_TIMEOUT)
        .unwrap_or_else(|e| panic!("device connect: {e}; stdout: {:?}", connect_out.lines()));
    assert!(line.contains("push seq=1"), "{line}");
    assert!(line.contains(&message_id), "{line}");
    assert!(line.contains("\"hi\""), "{line}");
    let status = wait_exit(&mut connect, STEP_TIMEOUT);
    if status.is_none() {
        let _ = connect.kill();
    }
    let status = status.expect("device connect exits after --count 1");
    assert!(
        status.success(),
        "device connect exited with {status:?}; stderr: {:?}",
        connect_err.lines()
    );

    // 5. The server recorded the acknowledgement.
    let mut sender = server.api().await.sender();
    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    loop {
        let status = sender
            .get_message_status(GetMessageStatusRequest {
                message_id: message_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if status
            .recipients
            .iter()
            .all(|r| r.state() == DeliveryState::Acked)
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not acked: {status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status_out = cli(&["status", &message_id, "--api", &api, "--data-dir", data_dir]);
    assert!(
        status_out.contains("phone-1") && status_out.contains("Acked"),
        "{status_out}"
    );

    // 6. The device is listed (and in its group).
    let list = cli(&["device", "list", "--api", &api, "--data-dir", data_dir]);
    assert!(
        list.lines().next().is_some_and(|h| h.starts_with("DEVICE")),
        "{list}"
    );
    assert!(list.lines().any(|l| l.starts_with("phone-1 ")), "{list}");
    let list = cli(&[
        "device",
        "list",
        "--group",
        "ward:4B",
        "--api",
        &api,
        "--data-dir",
        data_dir,
    ]);
    assert!(list.lines().any(|l| l.starts_with("phone-1 ")), "{list}");
    let list = cli(&[
        "device",
        "list",
        "--group",
        "ward:9Z",
        "--api",
        &api,
        "--data-dir",
        data_dir,
    ]);
    assert!(!list.contains("phone-1"), "{list}");

    // 7. Enroll a second phone: the property list its container app saves, owner-only.
    let plist_file = tmp.path().join("phone-2.plist");
    cli(&[
        "device",
        "enroll",
        "phone-2",
        "--group",
        "ward:4B",
        "--out",
        path_str(&plist_file),
        "--api",
        &api,
        "--data-dir",
        data_dir,
    ]);
    let mode = std::fs::metadata(&plist_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "enrollment file mode {mode:o}");
    let enrollment: plist::Dictionary = plist::from_file(&plist_file).unwrap();
    let provider = enrollment["providerConfiguration"].as_dictionary().unwrap();
    assert_eq!(provider["deviceId"].as_string(), Some("phone-2"));
    assert_eq!(
        provider["port"].as_unsigned_integer(),
        Some(u64::from(server.device_addr.port()))
    );
    assert_eq!(
        provider["pins"].as_array().unwrap().len(),
        2,
        "current and next pin"
    );
    let list = cli(&[
        "device",
        "list",
        "--group",
        "ward:4B",
        "--api",
        &api,
        "--data-dir",
        data_dir,
    ]);
    assert!(list.lines().any(|l| l.starts_with("phone-2 ")), "{list}");
}
