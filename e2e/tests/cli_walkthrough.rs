//! The README walkthrough through the real CLI: issue a credential to a file, connect as the
//! device in the background, send it a message, see it arrive, list the device. Then
//! `call --wait` following a call live to its answer (exit 0) or to every phone declining
//! (exit 3), and a bad `--escalate` refused by the argument parser.

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Child, Output, Stdio},
    time::Duration,
};

use e2e::{DeviceClient, LineReader, STEP_TIMEOUT, ServerProcess, server_command, wait_exit, within};
use push_proto::{
    device::{CallOutcome, CallOutcomeResult, push},
    sender::{DeliveryState, GetMessageStatusRequest},
};

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
    let cli_api = |command: &[&str]| cli(&[command, &["--api", &api, "--data-dir", data_dir]].concat());

    // 1. Issue a credential into a file readable only by its owner.
    let cred_file = tmp.path().join("phone-1.cred");
    let out = cli_api(&[
        "device",
        "issue",
        "phone-1",
        "--group",
        "ward:4B",
        "--out",
        path_str(&cred_file),
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
    let out = cli_api(&["send", "--device", "phone-1", "--body", "hi"]);
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
    let status_out = cli_api(&["status", &message_id]);
    assert!(
        status_out.contains("phone-1") && status_out.contains("acked"),
        "{status_out}"
    );

    // The same, for scripts.
    let json = |command: &[&str]| -> serde_json::Value {
        let out = cli_api(&[command, &["--json"]].concat());
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{command:?} --json: {e}: {out}"))
    };
    let status = json(&["status", &message_id]);
    assert_eq!(status["message_id"], message_id.as_str(), "{status}");
    let phone_1 = &status["recipients"][0];
    assert_eq!(
        (&phone_1["device_id"], &phone_1["state"]),
        (&"phone-1".into(), &"acked".into()),
        "{status}"
    );
    assert!(phone_1["at_ms"].as_i64().is_some_and(|ms| ms > 0), "{status}");

    // 6. The device is listed (and in its group).
    let listed = json(&["device", "list"]);
    let phone_1 = listed
        .as_array()
        .and_then(|all| all.iter().find(|d| d["device_id"] == "phone-1"))
        .unwrap_or_else(|| panic!("phone-1 not listed: {listed}"));
    assert_eq!(phone_1["groups"], serde_json::json!(["ward:4B"]), "{listed}");
    assert_eq!(phone_1["voip_token"], "none", "{listed}");
    let keys = json(&["key", "list"]);
    assert!(
        keys.as_array().is_some_and(|all| all
            .iter()
            .any(|k| k["state"] == "active" && k["scopes"] == serde_json::json!(["admin"]))),
        "{keys}"
    );
    let list = cli_api(&["device", "list"]);
    assert!(
        list.lines().next().is_some_and(|h| h.starts_with("DEVICE")),
        "{list}"
    );
    assert!(list.lines().any(|l| l.starts_with("phone-1 ")), "{list}");
    let list = cli_api(&["device", "list", "--group", "ward:4B"]);
    assert!(list.lines().any(|l| l.starts_with("phone-1 ")), "{list}");
    let list = cli_api(&["device", "list", "--group", "ward:9Z"]);
    assert!(!list.contains("phone-1"), "{list}");

    // 7. Enroll a second phone: the property list its container app saves, owner-only.
    let plist_file = tmp.path().join("phone-2.plist");
    cli_api(&[
        "device",
        "enroll",
        "phone-2",
        "--group",
        "ward:4B",
        "--out",
        path_str(&plist_file),
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
    let list = cli_api(&["device", "list", "--group", "ward:4B"]);
    assert!(list.lines().any(|l| l.starts_with("phone-2 ")), "{list}");
}

/// Whether `line` starts with a local clock time, `HH:MM:SS.mmm`.
fn starts_with_clock(line: &str) -> bool {
    let b = line.as_bytes();
    b.len() >= 12
        && [0, 1, 3, 4, 6, 7, 9, 10, 11]
            .iter()
            .all(|&i| b[i].is_ascii_digit())
        && (b[2], b[5], b[8]) == (b':', b':', b'.')
}

/// No run of 13 digits: times are printed for people, not as Unix ms.
fn no_unix_ms(lines: &[String]) {
    for l in lines {
        assert!(
            l.split(|c: char| !c.is_ascii_digit()).all(|run| run.len() < 13),
            "raw Unix ms in {l:?}"
        );
    }
}

/// `push-server call ... --wait` for nurse-a and nurse-b, running; its stdout and stderr.
fn call_wait(server: &ServerProcess, call_id: &str, extra: &[&str]) -> (Child, LineReader, LineReader) {
    let mut child = server_command()
        .args(["call", "--device", "nurse-a", "--device", "nurse-b"])
        .args([
            "--caller-name",
            "Bed 12",
            "--call-id",
            call_id,
            "--ring-secs",
            "60",
            "--wait",
        ])
        .args(extra)
        .args(["--api", &server.api_addr.to_string()])
        .args(["--data-dir", path_str(server.data_dir())])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn push-server call");
    let out = LineReader::spawn(child.stdout.take().unwrap());
    let err = LineReader::spawn(child.stderr.take().unwrap());
    (child, out, err)
}

/// The next push, which must be an invite (`true`) or a cancel (`false`) of `call_id`; acked.
async fn rings(phone: &mut DeviceClient, call_id: &str, invite: bool) {
    let p = within("a push", phone.next_push()).await.expect("push arrives");
    let id = match &p.body {
        Some(push::Body::CallInvite(c)) if invite => &c.call_id,
        Some(push::Body::CallCancel(c)) if !invite => &c.call_id,
        other => panic!(
            "expected {} of {call_id}, got {other:?}",
            if invite { "an invite" } else { "a cancel" }
        ),
    };
    assert_eq!(id, call_id);
    phone.ack(&[p.seq]).await.unwrap();
}

/// Wait for the CLI to exit; its status code, with its output on failure.
fn exit_code(child: &mut Child, out: &LineReader, err: &LineReader) -> i32 {
    let status = wait_exit(child, STEP_TIMEOUT);
    if status.is_none() {
        let _ = child.kill();
    }
    let status = status.unwrap_or_else(|| {
        panic!(
            "call --wait did not end; stdout: {:?}\nstderr: {:?}",
            out.lines(),
            err.lines()
        )
    });
    status
        .code()
        .unwrap_or_else(|| panic!("killed by a signal: {status:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_wait_follows_the_call_live_and_exits_by_its_outcome() {
    let tmp = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&tmp.path().join("data"), &[]);
    let cred_a = server.issue("nurse-a").await;
    let cred_b = server.issue("nurse-b").await;
    server.issue("charge").await;
    let mut a = server.connect(&cred_a, 0).await.expect("nurse-a connects");
    let mut b = server.connect(&cred_b, 0).await.expect("nurse-b connects");

    // Answered on nurse-a: every change printed live, then the outcome; exit status 0.
    let (mut child, out, err) = call_wait(&server, "code-blue", &["--escalate", "40:charge:stop"]);
    let placed = out
        .wait_for("rings until", STEP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}; stderr: {:?}", err.lines()));
    assert!(placed.starts_with("call code-blue (uuid "), "{placed}");
    rings(&mut a, "code-blue", true).await;
    rings(&mut b, "code-blue", true).await;
    // Live: the CLI shows nurse-a ringing before anyone answered.
    let acked = out.wait_for("ACKED", STEP_TIMEOUT).unwrap();
    assert!(starts_with_clock(&acked) && acked.contains("step 0"), "{acked}");
    let reply = within("answer", a.report_call("code-blue", CallOutcome::Answered))
        .await
        .unwrap();
    assert_eq!(reply.result(), CallOutcomeResult::Recorded, "{reply:?}");
    rings(&mut b, "code-blue", false).await;
    assert_eq!(
        exit_code(&mut child, &out, &err),
        0,
        "answered: {:?}",
        out.lines()
    );

    let lines = out.lines();
    no_unix_ms(&lines);
    let update = |device: &str, state: &str| {
        lines.iter().position(|l| {
            starts_with_clock(l) && l.contains(device) && l.contains(state) && l.contains("step 0  local")
        })
    };
    let rang = update("nurse-a", "ACKED").unwrap_or_else(|| panic!("nurse-a ringing: {lines:#?}"));
    let answered = update("nurse-a", "ANSWERED").unwrap_or_else(|| panic!("nurse-a answering: {lines:#?}"));
    assert!(rang < answered, "in order, as it happened: {lines:#?}");
    assert!(update("nurse-b", "CANCELLED").is_some(), "{lines:#?}");
    let outcome = lines
        .iter()
        .find(|l| l.starts_with("call code-blue ANSWERED by nurse-a at "))
        .unwrap_or_else(|| panic!("no outcome: {lines:#?}"));
    assert!(outcome.contains(" s after it was placed (placed "), "{outcome}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("step 1  due ") && l.ends_with("did not ring  charge (stops earlier steps)")),
        "the escalation step that never rang: {lines:#?}"
    );

    // Both decline: the outcome says so and the exit status is 3.
    let (mut child, out, err) = call_wait(&server, "code-red", &[]);
    out.wait_for("rings until", STEP_TIMEOUT).unwrap();
    rings(&mut a, "code-red", true).await;
    rings(&mut b, "code-red", true).await;
    for phone in [&mut a, &mut b] {
        let reply = within("decline", phone.report_call("code-red", CallOutcome::Declined))
            .await
            .unwrap();
        assert_eq!(reply.result(), CallOutcomeResult::Recorded, "{reply:?}");
    }
    assert_eq!(
        exit_code(&mut child, &out, &err),
        3,
        "declined: {:?}",
        out.lines()
    );
    let lines = out.lines();
    no_unix_ms(&lines);
    assert!(
        lines.iter().any(|l| l.starts_with("call code-red DECLINED at ")),
        "{lines:#?}"
    );
    assert!(
        err.lines().iter().all(|l| !l.starts_with("error:")),
        "{:?}",
        err.lines()
    );

    // A bad --escalate is the argument parser's error (status 2), naming the flag and why.
    let bad = server_command()
        .args([
            "call",
            "--device",
            "nurse-a",
            "--caller-name",
            "x",
            "--escalate",
            "soon:charge",
        ])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("--escalate") && stderr.contains("\"soon\" is not a number of seconds"),
        "{stderr}"
    );
}

/// `push-server device connect` as one phone of the README's ward, in the background.
fn phone(server: &ServerProcess, credential: &Path, on_call: &str, count: &str) -> (Child, LineReader) {
    let credential = format!("@{}", credential.display());
    let mut child = server_command()
        .args(["device", "connect", "--credential", &credential, "--count", count])
        .args(["--on-call", on_call])
        .args(["--addr", &server.device_addr.to_string()])
        .args(["--data-dir", path_str(server.data_dir())])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn device connect");
    let out = LineReader::spawn(child.stdout.take().unwrap());
    out.wait_for("connected as", STEP_TIMEOUT)
        .expect("the phone connects");
    (child, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_a_ward_first_answer_wins_as_the_readme_shows() {
    let tmp = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&tmp.path().join("data"), &[]);
    let (api, data_dir) = (
        server.api_addr.to_string(),
        path_str(server.data_dir()).to_string(),
    );
    let mut creds = Vec::new();
    for p in ["nurse-1", "nurse-2"] {
        let file = tmp.path().join(format!("{p}.jwt"));
        cli(&[
            "device",
            "issue",
            p,
            "--group",
            "ward:4B",
            "--out",
            path_str(&file),
            "--api",
            &api,
            "--data-dir",
            &data_dir,
        ]);
        creds.push(file);
    }
    // nurse-1 lets it ring (the invite, then the cancel); nurse-2's user answers.
    let (mut ringing, ringing_out) = phone(&server, &creds[0], "ignore", "2");
    let (mut answering, answering_out) = phone(&server, &creds[1], "answer", "1");
    let mut call = server_command()
        .args([
            "call",
            "--group",
            "ward:4B",
            "--caller-name",
            "Bed 12",
            "--call-id",
            "ward-4b",
            "--wait",
        ])
        .args(["--api", &api, "--data-dir", &data_dir])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn push-server call");
    let (out, err) = (
        LineReader::spawn(call.stdout.take().unwrap()),
        LineReader::spawn(call.stderr.take().unwrap()),
    );
    assert_eq!(exit_code(&mut call, &out, &err), 0, "answered: {:?}", out.lines());
    let reply = answering_out
        .wait_for("call ward-4b", STEP_TIMEOUT)
        .expect("the answering phone prints the server's reply");
    assert!(reply.contains("Answered -> Recorded"), "{reply}");
    let stop = ringing_out
        .wait_for("(AnsweredElsewhere)", STEP_TIMEOUT)
        .unwrap_or_else(|e| panic!("nurse-1 is told to stop: {e}; {:?}", ringing_out.lines()));
    assert!(stop.contains("ward-4b"), "{stop}");
    let summary = out.lines().join("\n");
    assert!(summary.contains("ANSWERED by nurse-2"), "{summary}");
    for child in [&mut ringing, &mut answering] {
        assert!(
            wait_exit(child, STEP_TIMEOUT).is_some_and(|s| s.success()),
            "the phone exits after its pushes"
        );
    }
}
